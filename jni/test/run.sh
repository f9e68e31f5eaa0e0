#!/usr/bin/env bash
# The JNI library (jni/) on the host JVM: builds libsdrs.so, compiles the Java API at
# Java 8 (what Android's toolchain takes) and SdrsTest, and runs it with JNI checking.
# Run after `cargo build --release` of the root crate (it uses target/release/sdrs to
# make a small GGUF). Needs a JDK: Debian's openjdk-17-jdk-headless.
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
for tool in javac java javap; do
  command -v "$tool" >/dev/null || { echo "jni test: $tool not found (apt-get install openjdk-17-jdk-headless)" >&2; exit 1; }
done

cargo build --release -p sdrs-jni --locked
test -f target/release/libsdrs.so

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
javac --release 8 -Xlint:all,-options -Werror -cp /usr/share/java/jsr305.jar -d "$work/api" jni/java/org/sdrs/*.java
# Class file version 52 is Java 8.
javap -v -cp "$work/api" org.sdrs.StableDiffusion | grep -q 'major version: 52'
javac -Xlint:all,-options -Werror -cp "$work/api:/usr/share/java/jsr305.jar" -d "$work/test" jni/test/SdrsTest.java

# A valid GGUF on disk for load(path) and fromFd(fd) (the demo model is only embedded).
target/release/sdrs synth tiny-sd15 -o "$work/tiny.safetensors"
target/release/sdrs convert "$work/tiny.safetensors" -o "$work/tiny.gguf"

# -Xcheck:jni makes the JVM check every JNI call the library makes; it reports misuse
# (a call with an exception pending, a bad reference) as warnings, which fail the run.
status=0
java -Xcheck:jni -Djava.library.path=target/release --add-opens java.base/java.io=ALL-UNNAMED \
  -cp "$work/api:$work/test" SdrsTest "$work/tiny.gguf" 2>&1 | tee "$work/test.log" || status=$?
if grep -q 'WARNING in native method' "$work/test.log"; then
  echo "jni test: the JVM's JNI checks reported misuse (above)"
  status=1
fi
echo "jni test: $(( $(date +%s) - start )) s"
exit "$status"
