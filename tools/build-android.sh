#!/usr/bin/env bash
# Builds target/android/sdrs.aar: the Java API (org.sdrs, jni/java) and libsdrs.so with
# ggml's shared libraries for arm64-v8a and x86_64.
#
#   tools/build-android.sh [--java-only] [--abi arm64-v8a|x86_64 ...] [--api LEVEL]
#
# Native builds need ANDROID_NDK_HOME (a recent NDK: ggml's newest arm64 CPU variant
# needs a clang that targets armv9.2-a) and the Rust targets
# (rustup target add aarch64-linux-android x86_64-linux-android). cargo-ndk is used
# when installed, else cargo with the NDK's clang as linker and C/C++ compiler.
# Without ANDROID_NDK_HOME, or with --java-only, only the Java part is built and
# checked, and the aar has no native libraries.
#
# Apps must extract native libraries at install (android:extractNativeLibs="true" in
# their manifest, or `packaging { jniLibs { useLegacyPackaging = true } }` in Gradle):
# ggml finds its CPU variants (libggml-cpu-*.so) by listing the folder that holds
# libsdrs.so, and libraries left inside the APK are in no folder.
set -euo pipefail
cd "$(dirname "$0")/.."

api=24
abis=()
java_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --java-only) java_only=1 ;;
    --abi) abis+=("$2"); shift ;;
    --api) api="$2"; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "build-android: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ ${#abis[@]} -gt 0 ] || abis=(arm64-v8a x86_64)
if [ "$java_only" = 0 ] && [ -z "${ANDROID_NDK_HOME:-}" ]; then
  echo "build-android: ANDROID_NDK_HOME is not set: building the Java part only (an aar without native libraries)"
  java_only=1
fi

die() { echo "build-android: $*" >&2; exit 1; }
out=target/android
stage="$out/aar"
rm -rf "$stage" "$out/classes" "$out/sdrs.aar"
mkdir -p "$stage" "$out/classes"

# --- Java: Android's D8 takes Java 8 class files (version 52).
javac --release 8 -Xlint:all,-options -Werror -d "$out/classes" jni/java/org/sdrs/*.java
for c in "$out"/classes/org/sdrs/*.class; do
  # Bytes 6-7 of a class file are its major version.
  v=$(od -An -tu1 -j6 -N2 "$c" | awk '{print $1 * 256 + $2}')
  [ "$v" = 52 ] || die "$c has class version $v, not 52 (Java 8)"
done
jar cf "$stage/classes.jar" -C "$out/classes" .
cat > "$stage/AndroidManifest.xml" <<EOF
<?xml version="1.0" encoding="utf-8"?>
<manifest xmlns:android="http://schemas.android.com/apk/res/android" package="org.sdrs">
    <uses-sdk android:minSdkVersion="$api" />
</manifest>
EOF
# No resources; the Android Gradle plugin expects the file.
: > "$stage/R.txt"
# The native library reads Request's fields, makes Image and throws the exceptions by
# name: an app's R8 must not rename or drop them.
cat > "$stage/proguard.txt" <<'EOF'
-keep class org.sdrs.** { *; }
EOF

# --- Native libraries, one ABI at a time.
triple_of() {
  case "$1" in
    arm64-v8a) echo aarch64-linux-android ;;
    x86_64) echo x86_64-linux-android ;;
    *) die "unsupported ABI $1 (arm64-v8a, x86_64)" ;;
  esac
}

# The llama-cpp-sys-2 build that this build linked, from cargo's JSON messages (a
# target folder can hold several, e.g. one with Vulkan).
ggml_out_dir() {
  python3 -c '
import json, sys
# Only JSON lines: a wrapper (cargo-ndk) may print its own.
dirs = [m["out_dir"] for m in (json.loads(l) for l in open(sys.argv[1]) if l.startswith("{"))
        if m.get("reason") == "build-script-executed" and "llama-cpp-sys-2" in m.get("package_id", "")]
if len(set(dirs)) != 1:
    sys.exit("expected one llama-cpp-sys-2 build in the messages, found %r" % sorted(set(dirs)))
print(dirs[0])' "$1"
}

build_abi() {
  local abi=$1 triple bin json ggml dest
  triple=$(triple_of "$abi")
  bin="$ANDROID_NDK_HOME/toolchains/llvm/prebuilt/linux-x86_64/bin"
  [ -x "$bin/$triple$api-clang" ] || die "no $bin/$triple$api-clang: is ANDROID_NDK_HOME an NDK with API $api?"
  [ -d "$(rustc --print target-libdir --target "$triple" 2>/dev/null)" ] || die "the Rust target $triple is not installed (rustup target add $triple)"
  # llama-cpp-sys-2 runs ggml's CMake with the NDK's toolchain file; it reads these names.
  export ANDROID_NDK="$ANDROID_NDK_HOME" ANDROID_API_LEVEL="$api"
  json="$out/cargo-$abi.json"
  # --no-default-features: no Vulkan backend on Android in this version (the root
  # crate's default); sdrs-jni keeps the demo model.
  echo "== $abi ($triple, API $api)"
  if cargo ndk --version >/dev/null 2>&1; then
    cargo ndk -t "$abi" -P "$api" build --release -p sdrs-jni --locked --no-default-features --message-format=json-render-diagnostics > "$json"
  else
    local t=${triple//-/_}
    local T=${t^^}
    export "CARGO_TARGET_${T}_LINKER=$bin/$triple$api-clang"
    export "CC_$t=$bin/$triple$api-clang" "CXX_$t=$bin/$triple$api-clang++" "AR_$t=$bin/llvm-ar"
    cargo build --release -p sdrs-jni --locked --no-default-features --target "$triple" --message-format=json-render-diagnostics > "$json"
  fi
  ggml=$(ggml_out_dir "$json")
  dest="$stage/jni/$abi"
  mkdir -p "$dest"
  cp "target/$triple/release/libsdrs.so" "$dest/"
  # -L: the install prefix has the names as symlinks; the APK wants plain files.
  cp -L "$ggml/lib/libggml.so" "$ggml/lib/libggml-base.so" "$dest/"
  ls "$ggml"/backends/libggml-cpu-*.so >/dev/null 2>&1 || die "no CPU variants in $ggml/backends"
  cp -L "$ggml"/backends/libggml-cpu-*.so "$dest/"
  # Every library a copied one needs must be in the folder or on every Android device.
  # APKs carry only lib*.so names, so a versioned soname (libggml.so.0) cannot load.
  local readelf="$bin/llvm-readelf" lib need
  for lib in "$dest"/*.so; do
    for need in $("$readelf" -d "$lib" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
      case "$need" in
        libc.so|libm.so|libdl.so|liblog.so|libandroid.so) ;;
        libc++_shared.so)
          [ -f "$dest/$need" ] || cp "$ANDROID_NDK_HOME/toolchains/llvm/prebuilt/linux-x86_64/sysroot/usr/lib/$triple/libc++_shared.so" "$dest/" ;;
        *.so) [ -f "$dest/$need" ] || die "$(basename "$lib") needs $need, which the build did not produce" ;;
        *) die "$(basename "$lib") needs $need: a versioned name that an APK cannot carry" ;;
      esac
    done
  done
  ls -l "$dest"
}

if [ "$java_only" = 0 ]; then
  for abi in "${abis[@]}"; do
    build_abi "$abi"
  done
fi

# An aar is a zip: no jar manifest of its own (M).
(cd "$stage" && jar cfM ../sdrs.aar .)
listing=$(jar tf "$out/sdrs.aar")
for entry in AndroidManifest.xml classes.jar R.txt proguard.txt; do
  grep -qx "$entry" <<<"$listing" || die "the aar lacks $entry"
done
classes=$(jar tf "$stage/classes.jar")
for c in StableDiffusion Request Image ProgressListener SdrsException CancelledException; do
  grep -qx "org/sdrs/$c.class" <<<"$classes" || die "classes.jar lacks org/sdrs/$c.class"
done
if [ "$java_only" = 0 ]; then
  for abi in "${abis[@]}"; do
    for lib in libsdrs.so libggml.so libggml-base.so; do
      grep -qx "jni/$abi/$lib" <<<"$listing" || die "the aar lacks jni/$abi/$lib"
    done
  done
fi
echo "wrote $out/sdrs.aar ($(wc -c < "$out/sdrs.aar") bytes):"
sed 's/^/  /' <<<"$listing"
