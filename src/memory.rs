//! Resident memory of this process over time, split into anonymous memory (what the
//! kernel must keep: activations, buffers) and file-backed pages (the memory-mapped
//! weights, which the kernel can drop and re-read under pressure).
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One reading of `/proc/self/status`, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rss {
    pub anon: u64,
    pub file: u64,
}

impl Rss {
    /// Now, from `/proc/self/status` (zeros where that file does not exist).
    pub fn now() -> Rss {
        let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        Rss {
            anon: status_field(&s, "RssAnon:"),
            file: status_field(&s, "RssFile:") + status_field(&s, "RssShmem:"),
        }
    }
}

fn status_field(s: &str, key: &str) -> u64 {
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Peak and current resident set size of this process in bytes (`VmHWM`, `VmRSS`).
pub fn peak_and_current() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    (status_field(&s, "VmHWM:"), status_field(&s, "VmRSS:"))
}

/// Samples [`Rss`] on a background thread until stopped; stages are marked by name.
pub struct Recorder {
    start: Instant,
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<(f64, Rss)>>>,
    marks: Mutex<Vec<(f64, String)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How often the recorder samples: fine enough to catch a VAE decode's peak, cheap
/// enough (one small procfs read) to be invisible in timings.
const PERIOD: Duration = Duration::from_millis(20);

impl Recorder {
    pub fn start() -> Recorder {
        let start = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(vec![(0.0, Rss::now())]));
        let thread = {
            let (stop, samples) = (stop.clone(), samples.clone());
            std::thread::Builder::new()
                .name("sdrs-memory".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(PERIOD);
                        let r = Rss::now();
                        if let Ok(mut v) = samples.lock() {
                            v.push((start.elapsed().as_secs_f64(), r));
                        }
                    }
                })
                .ok()
        };
        Recorder {
            start,
            stop,
            samples,
            marks: Mutex::new(Vec::new()),
            thread,
        }
    }

    /// Marks the start of a stage at the current time.
    pub fn mark(&self, stage: &str) {
        let t = self.start.elapsed().as_secs_f64();
        let r = Rss::now();
        if let Ok(mut v) = self.samples.lock() {
            v.push((t, r));
        }
        if let Ok(mut m) = self.marks.lock() {
            m.push((t, stage.to_string()));
        }
    }

    pub fn stop(mut self) -> Timeline {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut samples = self.samples.lock().map(|v| v.clone()).unwrap_or_default();
        samples.push((self.start.elapsed().as_secs_f64(), Rss::now()));
        samples.sort_by(|a, b| a.0.total_cmp(&b.0));
        let marks = self.marks.lock().map(|v| v.clone()).unwrap_or_default();
        Timeline { samples, marks }
    }
}

/// A finished recording: samples `(seconds, rss)` and stage marks `(seconds, name)`.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    pub samples: Vec<(f64, Rss)>,
    pub marks: Vec<(f64, String)>,
}

impl Timeline {
    pub fn peak_anon(&self) -> u64 {
        self.samples.iter().map(|s| s.1.anon).max().unwrap_or(0)
    }

    pub fn peak_file(&self) -> u64 {
        self.samples.iter().map(|s| s.1.file).max().unwrap_or(0)
    }

    /// Peak anonymous memory while each stage ran (a stage lasts until the next mark).
    pub fn peak_anon_by_stage(&self) -> Vec<(String, u64)> {
        self.marks
            .iter()
            .enumerate()
            .map(|(i, (t0, name))| {
                let t1 = self.marks.get(i + 1).map_or(f64::INFINITY, |m| m.0);
                let peak = self
                    .samples
                    .iter()
                    .filter(|s| s.0 >= *t0 && s.0 <= t1)
                    .map(|s| s.1.anon)
                    .max()
                    .unwrap_or(0);
                (name.clone(), peak)
            })
            .collect()
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "t_s": self.samples.iter().map(|s| (s.0 * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
            "anon_bytes": self.samples.iter().map(|s| s.1.anon).collect::<Vec<_>>(),
            "file_bytes": self.samples.iter().map(|s| s.1.file).collect::<Vec<_>>(),
            "marks": self.marks.iter().map(|(t, n)| serde_json::json!({"t_s": t, "stage": n})).collect::<Vec<_>>(),
            "peak_anon_by_stage": self.peak_anon_by_stage().into_iter().map(|(n, b)| serde_json::json!({"stage": n, "anon_bytes": b})).collect::<Vec<_>>(),
        })
    }

    /// A stacked area plot (anonymous below, file-backed above) with stage marks.
    pub fn to_svg(&self, title: &str) -> String {
        let (w, h, left, right, top, bottom) = (900.0, 360.0, 70.0, 20.0, 40.0, 40.0);
        let t_end = self.samples.last().map_or(1.0, |s| s.0).max(1e-3);
        let max = self
            .samples
            .iter()
            .map(|s| s.1.anon + s.1.file)
            .max()
            .unwrap_or(1)
            .max(1) as f64
            * 1.05;
        let x = |t: f64| left + (w - left - right) * t / t_end;
        let y = |b: f64| h - bottom - (h - top - bottom) * b / max;
        let area = |lo: &dyn Fn(&Rss) -> u64, hi: &dyn Fn(&Rss) -> u64| {
            let mut p = String::new();
            for (t, r) in &self.samples {
                let _ = write!(p, "{:.1},{:.1} ", x(*t), y(hi(r) as f64));
            }
            for (t, r) in self.samples.iter().rev() {
                let _ = write!(p, "{:.1},{:.1} ", x(*t), y(lo(r) as f64));
            }
            p
        };
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
        );
        let _ = writeln!(
            s,
            r#"<rect width="100%" height="100%" fill="white"/><text x="{left}" y="20" font-size="14">{}</text>"#,
            xml_escape(title)
        );
        let _ = writeln!(
            s,
            r##"<polygon fill="#4878d0" fill-opacity="0.8" points="{}"/>"##,
            area(&|_| 0, &|r| r.anon)
        );
        let _ = writeln!(
            s,
            r##"<polygon fill="#ee854a" fill-opacity="0.6" points="{}"/>"##,
            area(&|r| r.anon, &|r| r.anon + r.file)
        );
        let step = nice_step(max / 1e6 / 5.0);
        let mut mb = 0.0;
        while mb * 1e6 <= max {
            let yy = y(mb * 1e6);
            let _ = writeln!(
                s,
                r##"<line x1="{left}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{mb:.0} MB</text>"##,
                w - right,
                left - 4.0,
                yy + 4.0
            );
            mb += step;
        }
        for (t, name) in &self.marks {
            let (xx, ty) = (x(*t), top + 60.0);
            let _ = writeln!(
                s,
                r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{top}" y2="{}" stroke="#555" stroke-dasharray="3,3"/><text x="{:.1}" y="{ty}" transform="rotate(-90 {:.1} {ty})">{}</text>"##,
                h - bottom,
                xx + 11.0,
                xx + 11.0,
                xml_escape(name)
            );
        }
        let _ = writeln!(
            s,
            r##"<text x="{left}" y="{}">0 s</text><text x="{}" y="{}" text-anchor="end">{t_end:.1} s</text>"##,
            h - 22.0,
            w - right,
            h - 22.0
        );
        let _ = writeln!(
            s,
            r##"<rect x="{}" y="8" width="10" height="10" fill="#4878d0"/><text x="{}" y="17">anonymous</text><rect x="{}" y="8" width="10" height="10" fill="#ee854a"/><text x="{}" y="17">file-backed (mmap)</text>"##,
            w - 260.0,
            w - 246.0,
            w - 160.0,
            w - 146.0
        );
        s.push_str("</svg>\n");
        s
    }
}

fn nice_step(raw: f64) -> f64 {
    let mag = 10f64.powf(raw.max(1e-9).log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_sees_an_anonymous_allocation_and_its_stage() {
        // Other tests run in parallel threads and allocate too: use a large block and
        // compare the stage's peak with the lowest reading before it.
        let rec = Recorder::start();
        rec.mark("before");
        std::thread::sleep(Duration::from_millis(30));
        rec.mark("alloc");
        let v = vec![1u8; 256 << 20];
        std::thread::sleep(Duration::from_millis(60));
        rec.mark("after");
        std::hint::black_box(&v);
        let tl = rec.stop();
        drop(v);
        let by = tl.peak_anon_by_stage();
        assert_eq!(
            by.iter().map(|b| b.0.as_str()).collect::<Vec<_>>(),
            ["before", "alloc", "after"]
        );
        let t_alloc = tl.marks[1].0;
        let low_before = tl
            .samples
            .iter()
            .filter(|s| s.0 <= t_alloc)
            .map(|s| s.1.anon)
            .min()
            .unwrap_or(0);
        assert!(
            by[1].1 >= low_before + (200 << 20),
            "{by:?}, lowest before {low_before}"
        );
        let svg = tl.to_svg("t<1>");
        assert!(svg.starts_with("<svg") && svg.contains("t&lt;1&gt;") && svg.contains("alloc"));
    }
}
