#!/bin/sh
# Builds the Android library: target/android/sdrs.aar (the Java API, org.sdrs, from
# jni/java, and libsdrs.so with ggml's shared libraries for arm64-v8a and x86_64), and
# the same aar with a pom in a Maven repository folder, target/android/maven, as
# org.sdrs:sdrs-android:VERSION (VERSION: jni/Cargo.toml's).
#
#   tools/build-android.sh [--java-only] [--abi arm64-v8a|x86_64 ...] [--api LEVEL]
#
# Native builds need an NDK (a recent one: ggml's newest arm64 CPU variant needs a clang
# that targets armv9.2-a), found from ANDROID_NDK_HOME, ANDROID_NDK_ROOT, or the newest
# under $ANDROID_HOME/ndk or $ANDROID_SDK_ROOT/ndk, on a Linux or macOS host; and the
# Rust targets (rustup target add aarch64-linux-android x86_64-linux-android).
# cargo-ndk is used when installed, else cargo with the NDK's clang as linker and C/C++
# compiler. Without an NDK, or with --java-only, only the Java part is built and
# checked, and the aar has no native libraries.
#
# Every shared object is linked for 16 KB pages and checked (tools/elf-align.sh).
# Apps need no extractNativeLibs setting: when the libraries stay inside the APK, sdrs
# lists ggml's CPU variants from the APK's zip directory and loads them by name.
#
# POSIX sh (macOS's /bin/sh and bash 3.2 included); needs javac, jar and od.
set -eu
cd "$(dirname "$0")/.."

api=24
abis=""
java_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --java-only) java_only=1 ;;
    --abi) abis="$abis $2"; shift ;;
    --api) api="$2"; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "build-android: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$abis" ] || abis="arm64-v8a x86_64"

die() { echo "build-android: $*" >&2; exit 1; }

# The NDK: named outright, else the newest side-by-side one of the SDK.
find_ndk() {
  for ndk in "${ANDROID_NDK_HOME:-}" "${ANDROID_NDK_ROOT:-}"; do
    if [ -n "$ndk" ] && [ -d "$ndk/toolchains/llvm" ]; then echo "$ndk"; return; fi
  done
  for sdk in "${ANDROID_HOME:-}" "${ANDROID_SDK_ROOT:-}"; do
    [ -n "$sdk" ] && [ -d "$sdk/ndk" ] || continue
    # Versions like 27.2.12479018: sorted field by field, numerically.
    newest=$(ls "$sdk/ndk" | sort -t. -k1,1n -k2,2n -k3,3n | tail -n 1)
    if [ -n "$newest" ] && [ -d "$sdk/ndk/$newest/toolchains/llvm" ]; then echo "$sdk/ndk/$newest"; return; fi
  done
}

ndk=""
if [ "$java_only" = 0 ]; then
  ndk=$(find_ndk)
  if [ -z "$ndk" ]; then
    echo "build-android: no NDK (set ANDROID_NDK_HOME, or ANDROID_HOME with an ndk/ folder): building the Java part only (an aar without native libraries)"
    java_only=1
  fi
fi
# The NDK ships one prebuilt toolchain per host; on Apple silicon it is the x86-64 one
# (universal binaries).
case "$(uname -s)" in
  Linux) host=linux-x86_64 ;;
  Darwin) host=darwin-x86_64 ;;
  *) [ "$java_only" = 1 ] || die "unsupported host $(uname -s) (Linux or macOS)" ;;
esac

version=$(sed -n 's/^version = "\(.*\)"/\1/p' jni/Cargo.toml | head -n 1)
[ -n "$version" ] || die "no version in jni/Cargo.toml"
out=target/android
stage="$out/aar"
rm -rf "$stage" "$out/classes" "$out/sdrs.aar" "$out/maven"
mkdir -p "$stage" "$out/classes"

# --- Java: Android's D8 takes Java 8 class files (version 52). The JSR-305 nullness
# annotations (which Kotlin reads) are compile-only: annotations absent at run time are
# ignored, so the aar does not carry them.
jsr305=${JSR305_JAR:-/usr/share/java/jsr305.jar}
[ -f "$jsr305" ] || die "no $jsr305 (Debian: libjsr305-java; or set JSR305_JAR to com.google.code.findbugs:jsr305's jar)"
javac --release 8 -Xlint:all,-options -Werror -cp "$jsr305" -d "$out/classes" jni/java/org/sdrs/*.java
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
# The native library reads Request's fields, makes Image, Progress and Plan and throws
# the exceptions by name: an app's R8 must not rename or drop them.
cat > "$stage/proguard.txt" <<'EOF'
-keep class org.sdrs.** { *; }
-dontwarn javax.annotation.**
EOF

# --- Native libraries, one ABI at a time.
triple_of() {
  case "$1" in
    arm64-v8a) echo aarch64-linux-android ;;
    x86_64) echo x86_64-linux-android ;;
    *) die "unsupported ABI $1 (arm64-v8a, x86_64)" ;;
  esac
}

# The llama-cpp-sys-2 build this build linked, from cargo's JSON messages (a target
# folder can hold several, e.g. one with Vulkan).
ggml_out_dir() {
  dirs=$(grep '^{' "$1" | grep '"reason":"build-script-executed"' | grep 'llama-cpp-sys-2' \
    | sed 's/.*"out_dir":"\([^"]*\)".*/\1/' | sort -u)
  [ "$(printf '%s\n' "$dirs" | grep -c .)" = 1 ] || die "expected one llama-cpp-sys-2 build in $1, found: $dirs"
  echo "$dirs"
}

build_abi() {
  abi=$1
  triple=$(triple_of "$abi")
  bin="$ndk/toolchains/llvm/prebuilt/$host/bin"
  [ -x "$bin/$triple$api-clang" ] || die "no $bin/$triple$api-clang: is $ndk an NDK with API $api?"
  [ -d "$(rustc --print target-libdir --target "$triple" 2>/dev/null)" ] || die "the Rust target $triple is not installed (rustup target add $triple)"
  # llama-cpp-sys-2 runs ggml's CMake with the NDK's toolchain file; it reads these
  # names. CMake takes LDFLAGS as the linker flags of ggml's shared libraries.
  export ANDROID_NDK="$ndk" ANDROID_API_LEVEL="$api" LDFLAGS="-Wl,-z,max-page-size=16384"
  json="$out/cargo-$abi.json"
  # --no-default-features: no Vulkan backend on Android in this version (the root
  # crate's default); sdrs-jni keeps the demo model.
  echo "== $abi ($triple, API $api, NDK $ndk)"
  if cargo ndk --version >/dev/null 2>&1; then
    cargo ndk -t "$abi" -P "$api" build --release -p sdrs-jni --locked --no-default-features --message-format=json-render-diagnostics > "$json"
  else
    t=$(echo "$triple" | tr '-' '_')
    T=$(echo "$t" | tr '[:lower:]' '[:upper:]')
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
  readelf="$bin/llvm-readelf"
  for lib in "$dest"/*.so; do
    for need in $("$readelf" -d "$lib" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
      case "$need" in
        libc.so|libm.so|libdl.so|liblog.so|libandroid.so) ;;
        libc++_shared.so)
          [ -f "$dest/$need" ] || cp "$ndk/toolchains/llvm/prebuilt/$host/sysroot/usr/lib/$triple/libc++_shared.so" "$dest/" ;;
        *.so) [ -f "$dest/$need" ] || die "$(basename "$lib") needs $need, which the build did not produce" ;;
        *) die "$(basename "$lib") needs $need: a versioned name that an APK cannot carry" ;;
      esac
    done
  done
  READELF="$readelf" tools/elf-align.sh "$dest"/*.so || die "$abi: libraries not aligned for 16 KB pages"
  ls -l "$dest"
}

if [ "$java_only" = 0 ]; then
  for abi in $abis; do
    build_abi "$abi"
  done
fi

# An aar is a zip: no jar manifest of its own (M).
(cd "$stage" && jar cfM ../sdrs.aar .)
listing=$(jar tf "$out/sdrs.aar")
has() { printf '%s\n' "$1" | grep -qx "$2"; }
for entry in AndroidManifest.xml classes.jar R.txt proguard.txt; do
  has "$listing" "$entry" || die "the aar lacks $entry"
done
classes=$(jar tf "$stage/classes.jar")
for c in StableDiffusion Request Image Progress 'Progress$Stage' ProgressListener Plan 'Plan$Need' Cancellation SdrsException CancelledException; do
  has "$classes" "org/sdrs/$c.class" || die "classes.jar lacks org/sdrs/$c.class"
done
if [ "$java_only" = 0 ]; then
  for abi in $abis; do
    for lib in libsdrs.so libggml.so libggml-base.so; do
      has "$listing" "jni/$abi/$lib" || die "the aar lacks jni/$abi/$lib"
    done
  done
fi

# --- A Maven repository folder: Gradle takes it as
#   repositories { maven { url = uri("/path/to/target/android/maven") } }
#   dependencies { implementation("org.sdrs:sdrs-android:$version") }
repo="$out/maven/org/sdrs/sdrs-android/$version"
mkdir -p "$repo"
cp "$out/sdrs.aar" "$repo/sdrs-android-$version.aar"
cat > "$repo/sdrs-android-$version.pom" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:schemaLocation="http://maven.apache.org/POM/4.0.0 https://maven.apache.org/xsd/maven-4.0.0.xsd">
  <modelVersion>4.0.0</modelVersion>
  <groupId>org.sdrs</groupId>
  <artifactId>sdrs-android</artifactId>
  <version>$version</version>
  <packaging>aar</packaging>
  <name>sdrs</name>
  <description>Stable Diffusion at the edge: quantized, memory-mapped GGUF models on ggml, for Android</description>
  <licenses>
    <license>
      <name>MIT</name>
    </license>
  </licenses>
</project>
EOF
# Checksums, as Maven repositories serve them (Gradle verifies them when present).
for f in "$repo"/*.aar "$repo"/*.pom; do
  if command -v sha256sum >/dev/null 2>&1; then
    sha256sum "$f" | cut -d' ' -f1 > "$f.sha256"
  else
    shasum -a 256 "$f" | cut -d' ' -f1 > "$f.sha256"
  fi
done
echo "wrote $out/sdrs.aar ($(wc -c < "$out/sdrs.aar" | tr -d ' ') bytes) and $repo:"
printf '%s\n' "$listing" | sed 's/^/  /'
ls "$repo" | sed 's/^/  /'
