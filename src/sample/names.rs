//! The names people already type for samplers and schedules: sdrs' and
//! stable-diffusion.cpp's (`euler_a`, `dpm++2m`, `ddim_trailing`), A1111's display
//! names with their scheduler suffix (`Euler a`, `DPM++ 2M Karras`) and ComfyUI's
//! (`euler_ancestral`, `dpmpp_2m`, `uni_pc_bh2`). One table, used by the CLI, the
//! library's callers and the JNI alike.
use super::{Sampler, Schedule, Spacing};

/// A name folded for matching: lower case, `++` read as `pp`, and spaces, `_`, `-`
/// and `.` dropped, so `DPM++ 2M`, `dpm++2m` and `dpmpp_2m` are one key.
fn fold(name: &str) -> String {
    name.to_lowercase()
        .replace("++", "pp")
        .chars()
        .filter(|c| !matches!(c, ' ' | '_' | '-' | '.'))
        .collect()
}

/// Spellings beyond each sampler's own name and A1111 display name (both always
/// accepted), with the schedule the spelling implies.
const ALIASES: &[(&str, Sampler, Option<Schedule>)] = &[
    ("euler_ancestral", Sampler::EulerA, None),
    ("k_euler", Sampler::Euler, None),
    ("k_euler_a", Sampler::EulerA, None),
    ("dpm_2", Sampler::Dpm2, None),
    ("dpm_2_ancestral", Sampler::Dpm2A, None),
    ("dpmpp_2s_ancestral", Sampler::DpmPP2SA, None),
    ("uni_pc_bh2", Sampler::UniPc, None),
    ("ipndm", Sampler::Ipndm, None),
    (
        "ddim_trailing",
        Sampler::Ddim,
        Some(Schedule::Discrete(Spacing::Trailing)),
    ),
];

/// Schedule spellings: sdrs' and stable-diffusion.cpp's, A1111's "Schedule type" and
/// ComfyUI's scheduler names (`normal`, A1111's `Uniform` and `Automatic` are the
/// model's own evenly spaced timesteps).
const SCHEDULES: &[(&str, Schedule)] = &[
    ("discrete", Schedule::Discrete(Spacing::Linspace)),
    ("linspace", Schedule::Discrete(Spacing::Linspace)),
    ("normal", Schedule::Discrete(Spacing::Linspace)),
    ("uniform", Schedule::Discrete(Spacing::Linspace)),
    ("automatic", Schedule::Discrete(Spacing::Linspace)),
    ("leading", Schedule::Discrete(Spacing::Leading)),
    ("trailing", Schedule::Discrete(Spacing::Trailing)),
    ("karras", Schedule::Karras),
    ("exponential", Schedule::Exponential),
    ("ays", Schedule::Ays),
    ("align_your_steps", Schedule::Ays),
    ("sgm_uniform", Schedule::SgmUniform),
    ("simple", Schedule::Simple),
];

/// The sampler a name means, and the schedule it implies where it names one
/// (`DPM++ 2M Karras`, `ddim_trailing`).
pub fn sampler(name: &str) -> Option<(Sampler, Option<Schedule>)> {
    let key = fold(name);
    if key.is_empty() {
        return None;
    }
    let own = Sampler::all()
        .iter()
        .find(|i| fold(i.name) == key || fold(i.display) == key)
        .map(|i| (i.sampler, None));
    let alias = || {
        ALIASES
            .iter()
            .find(|a| fold(a.0) == key)
            .map(|a| (a.1, a.2))
    };
    own.or_else(alias).or_else(|| {
        // A1111's "<sampler> <schedule type>" names.
        SCHEDULES.iter().find_map(|(s, schedule)| {
            let rest = key.strip_suffix(fold(s).as_str())?;
            let (sampler, implied) = sampler(rest)?;
            implied.is_none().then_some((sampler, Some(*schedule)))
        })
    })
}

/// The schedule a name means.
pub fn schedule(name: &str) -> Option<Schedule> {
    let key = fold(name);
    SCHEDULES.iter().find(|(s, _)| fold(s) == key).map(|s| s.1)
}

/// The names `--help` lists: each sampler's own.
pub fn sampler_names() -> Vec<&'static str> {
    Sampler::names()
}

/// The schedule names `--help` lists: sdrs' own, then the other spellings accepted.
pub fn schedule_names() -> Vec<&'static str> {
    SCHEDULES.iter().map(|s| s.0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peers_a1111s_and_comfyuis_spellings_name_the_same_samplers() {
        let cases: &[(&str, Sampler, Option<Schedule>)] = &[
            ("euler_a", Sampler::EulerA, None),
            ("Euler a", Sampler::EulerA, None),
            ("euler_ancestral", Sampler::EulerA, None),
            ("dpm++2m", Sampler::DpmPP2M, None),
            ("DPM++ 2M", Sampler::DpmPP2M, None),
            ("dpmpp_2m", Sampler::DpmPP2M, None),
            ("DPM++ 2M Karras", Sampler::DpmPP2M, Some(Schedule::Karras)),
            (
                "DPM++ 2M SDE Exponential",
                Sampler::DpmPP2MSde,
                Some(Schedule::Exponential),
            ),
            ("dpmpp_2m_sde", Sampler::DpmPP2MSde, None),
            (
                "DPM++ SDE Karras",
                Sampler::DpmPPSde,
                Some(Schedule::Karras),
            ),
            ("dpm_2_ancestral", Sampler::Dpm2A, None),
            ("DPM2 a Karras", Sampler::Dpm2A, Some(Schedule::Karras)),
            ("dpmpp_2s_ancestral", Sampler::DpmPP2SA, None),
            ("uni_pc", Sampler::UniPc, None),
            ("uni_pc_bh2", Sampler::UniPc, None),
            (
                "ddim_trailing",
                Sampler::Ddim,
                Some(Schedule::Discrete(Spacing::Trailing)),
            ),
            ("DDIM", Sampler::Ddim, None),
            ("LMS Karras", Sampler::Lms, Some(Schedule::Karras)),
            (
                "Euler SGM Uniform",
                Sampler::Euler,
                Some(Schedule::SgmUniform),
            ),
            (
                "Euler Align Your Steps",
                Sampler::Euler,
                Some(Schedule::Ays),
            ),
            ("lcm", Sampler::Lcm, None),
            ("iPNDM", Sampler::Ipndm, None),
        ];
        for (name, s, sch) in cases {
            assert_eq!(sampler(name), Some((*s, *sch)), "{name}");
        }
    }

    #[test]
    fn unknown_or_doubled_names_are_not_guessed() {
        for name in [
            "",
            "eulerx",
            "Karras",
            "ddim_trailing karras",
            "dpm++2mv2",
            "DPM++ 2M Karras Karras",
        ] {
            assert_eq!(sampler(name), None, "{name}");
        }
    }

    #[test]
    fn schedule_spellings_of_each_front_end_agree() {
        assert_eq!(schedule("Karras"), Some(Schedule::Karras));
        assert_eq!(schedule("SGM Uniform"), Some(Schedule::SgmUniform));
        assert_eq!(
            schedule("normal"),
            Some(Schedule::Discrete(Spacing::Linspace))
        );
        assert_eq!(schedule("Align Your Steps"), Some(Schedule::Ays));
        assert_eq!(
            schedule("trailing"),
            Some(Schedule::Discrete(Spacing::Trailing))
        );
        assert_eq!(schedule("beta"), None);
        for n in Schedule::NAMES {
            assert_eq!(schedule(n), Schedule::parse(n), "{n}");
        }
    }
}
