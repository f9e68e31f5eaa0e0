#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    sdrs::fuzz::image(data);
});
