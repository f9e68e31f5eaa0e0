#!/usr/bin/env bash
# Installs what building sdrs needs and a fresh Debian 12 machine lacks:
#   cmake          - the ggml C library is built by llama-cpp-sys-2 with CMake
#   libclang-dev   - bindgen (ours and llama-cpp-sys-2's) parses the ggml headers with libclang
#   glslc, libvulkan-dev, spirv-headers
#                  - ggml's Vulkan backend (the `vulkan` feature, on by default): its
#                    shaders are compiled to SPIR-V at build time
#   Vulkan headers - ggml needs Vulkan-Hpp newer than Debian 12's (1.3.239 lacks
#                    VK_EXT_layer_settings): Debian 13's libvulkan-dev package is
#                    unpacked into target/vulkan-sdk (headers only; nothing is
#                    installed system-wide), which .cargo/config.toml points VULKAN_SDK at
#   mesa-vulkan-drivers - lavapipe, a software Vulkan device, so the Vulkan path is
#                  testable; from bookworm-backports (Mesa 25), as Debian 12's Mesa 22.3
#                  lavapipe crashes in ggml's shaders
#   gguf (PyPI)    - only for tools/check_gguf.py, the cross-check with the reference Python reader
# Options add what other targets need:
#   --aarch64  cross-building and testing for aarch64 (tools/cross-aarch64.sh): Debian's
#              cross gcc/g++ (sysroot, linker), clang-16 (ggml's armv9.2 variants need
#              +sme, which gcc 12 lacks), qemu-user, Debian's rustc-web with its
#              arm64 standard library (rustup cannot download targets on these machines),
#              and the arm64 C and C++ runtimes that qemu runs the tests with
#   --java     OpenJDK and JSR-305's annotations, for the JNI library's host test
#              (jni/test/run.sh)
#   --fuzz     ccache, before the release build: ggml's CMake then caches its objects,
#              and the fuzz build (tools/fuzz.sh) reuses them instead of building ggml again
# Safe to run repeatedly; installs nothing that is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
aarch64=0 java=0 fuzz=0
for a in "$@"; do
  case "$a" in
    --aarch64) aarch64=1 ;;
    --java) java=1 ;;
    --fuzz) fuzz=1 ;;
    *) echo "sdrs setup: unknown option $a (known: --aarch64, --java, --fuzz)" >&2; exit 2 ;;
  esac
done

have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
if [ -z "${LIBCLANG_PATH:-}" ] && ! ldconfig -p 2>/dev/null | grep -q 'libclang\(-[0-9.]*\)\?\.so'; then
  missing+=(libclang-dev)
fi
for p in glslc libvulkan-dev spirv-headers; do have_pkg "$p" || missing+=("$p"); done
backports=()
case "$(dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null)" in
  2[5-9].*|[3-9]*) ;;
  *) backports+=(mesa-vulkan-drivers) ;;
esac
if [ $aarch64 = 1 ]; then
  dpkg --print-foreign-architectures | grep -qx arm64 || { [ "$(id -u)" = 0 ] && dpkg --add-architecture arm64; }
  for p in gcc-aarch64-linux-gnu g++-aarch64-linux-gnu clang-16 qemu-user rustc-web libstd-rust-web-dev:arm64 libstd-rust-web-dev libc6:arm64 libstdc++6:arm64; do
    have_pkg "$p" || missing+=("$p")
  done
fi
if [ $fuzz = 1 ]; then command -v ccache >/dev/null 2>&1 || missing+=(ccache); fi
if [ $java = 1 ]; then
  command -v javac >/dev/null 2>&1 || missing+=(openjdk-17-jdk-headless)
  # JSR-305's @Nonnull/@CheckForNull, which Kotlin reads as non-null/nullable types:
  # compile-only (the aar does not carry them; annotations absent at run time are ignored).
  [ -f /usr/share/java/jsr305.jar ] || missing+=(libjsr305-java)
  # The Android build script is POSIX sh: its --java-only run is checked under dash.
  command -v dash >/dev/null 2>&1 || missing+=(dash)
fi
if [ ${#missing[@]} -gt 0 ] || [ ${#backports[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    if [ ${#backports[@]} -gt 0 ] && ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d; then
      echo 'deb http://deb.debian.org/debian bookworm-backports main' > /etc/apt/sources.list.d/bookworm-backports.list
    fi
    echo "sdrs setup: installing ${missing[*]} ${backports[*]} (apt-get)" >&2
    apt-get update -qq
    [ ${#missing[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    [ ${#backports[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports "${backports[@]}" >/dev/null
  else
    echo "sdrs setup: missing ${missing[*]} ${backports[*]} (the last from bookworm-backports); install them with sudo apt-get install" >&2
    exit 1
  fi
fi

# Vulkan headers new enough for ggml, from Debian 13's package, unpacked under target/.
sdk=target/vulkan-sdk
if [ ! -f "$sdk/include/vulkan/vulkan.hpp" ] || ! grep -q LayerSettingEXT "$sdk/include/vulkan/vulkan_structs.hpp" 2>/dev/null; then
  echo "sdrs setup: unpacking Debian 13's Vulkan headers into $sdk" >&2
  apt_dir=$(mktemp -d)
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
  echo 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main' > "$apt_dir/sources.list"
  opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/nonexistent -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
  apt-get "${opts[@]}" update -qq
  (cd "$apt_dir" && apt-get "${opts[@]}" download -qq libvulkan-dev:amd64)
  rm -rf "$sdk" && mkdir -p "$sdk/lib"
  dpkg-deb -x "$apt_dir"/libvulkan-dev_*.deb "$apt_dir/x"
  mv "$apt_dir/x/usr/include" "$sdk/include"
  # Linking takes the system's loader (only ggml's Vulkan library uses it, at run time).
  ln -sf "/usr/lib/$(gcc -print-multiarch)/libvulkan.so.1" "$sdk/lib/libvulkan.so"
  rm -rf "$apt_dir"
fi

if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import gguf' 2>/dev/null; then
  python3 -m pip install -q --disable-pip-version-check gguf >/dev/null 2>&1 \
    || echo "sdrs setup: could not pip install gguf (only tools/check_gguf.py needs it)" >&2
fi
