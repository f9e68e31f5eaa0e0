//! What the CPU this process runs on can do, as the program sees it at run time (not
//! what it was compiled for): the instruction-set extensions that decide which of
//! ggml's CPU libraries and which variant of sdrs' own kernels are used.

/// Whether ggml multiplies bf16 matrices with vector instructions here: on x86-64
/// with AVX (its tinyBLAS kernels; AVX512-BF16 dot products where the CPU has them).
/// Its aarch64 build has only a scalar loop for bf16 (at its version here).
pub fn vector_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The extensions relevant to sdrs' and ggml's kernels that this CPU has.
pub fn features() -> Vec<&'static str> {
    let mut f = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($name:tt),*) => {$( if std::arch::is_x86_feature_detected!($name) { f.push($name); } )*};
        }
        probe!(
            "sse4.2",
            "avx",
            "f16c",
            "fma",
            "avx2",
            "bmi2",
            "avxvnni",
            "avx512f",
            "avx512bw",
            "avx512vbmi",
            "avx512vnni",
            "avx512bf16"
        );
    }
    #[cfg(target_arch = "aarch64")]
    {
        macro_rules! probe {
            ($($name:tt),*) => {$( if std::arch::is_aarch64_feature_detected!($name) { f.push($name); } )*};
        }
        probe!("neon", "fp16", "dotprod", "i8mm", "bf16", "sve", "sve2");
        // SME has no stable detection macro yet: the kernel's hwcap bit (HWCAP2_SME).
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if crate::ggml::aarch64_hwcap2() & (1 << 23) != 0 {
            f.push("sme");
        }
    }
    f
}
