//! Axis ticks: positions ("nice" 1/2/5 steps, decades on log axes) and labels.

/// How tick labels are written.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum TickFormat {
    /// Fixed point with this many decimals: "0.25", "1500".
    Fixed(usize),
    /// Scientific for tiny or huge ranges; `step` sets the mantissa precision.
    Sci { step: f64 },
    /// k/M/B/T suffixes: "250k", "1.5M"; `step` sets the precision.
    Si { step: f64 },
    /// Log axis values (1/2/5 × 10^k): shortest form, scientific beyond
    /// [1e-3, 1e6).
    Log,
}

/// Tick positions and how to label them.
#[derive(Clone, Debug)]
pub(crate) struct Ticks {
    pub values: Vec<f64>,
    pub format: TickFormat,
}

impl Ticks {
    pub(crate) fn label(&self, v: f64) -> String {
        match self.format {
            TickFormat::Fixed(d) => no_negative_zero(format!("{:.*}", d, v)),
            TickFormat::Sci { step } => {
                if v == 0.0 {
                    return "0".to_string();
                }
                let exp = v.abs().log10().floor();
                scientific(v, decimals_for(step / 10f64.powf(exp)))
            }
            TickFormat::Si { step } => si(v, step),
            TickFormat::Log => log_label(v),
        }
    }

    pub(crate) fn labels(&self) -> impl Iterator<Item = String> + '_ {
        self.values.iter().map(|&v| self.label(v))
    }
}

/// Decimals needed to write multiples of `step` exactly (at most 12).
fn decimals_for(step: f64) -> usize {
    let step = step.abs();
    if !step.is_finite() || step <= 0.0 {
        return 0;
    }
    (0..12)
        .find(|&d| {
            let scaled = step * 10f64.powi(d as i32);
            (scaled - scaled.round()).abs() < 1e-6 * scaled.max(1.0)
        })
        .unwrap_or(12)
}

fn trim_zeros(s: &str) -> String {
    if !s.contains('.') {
        return s.to_string();
    }
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn no_negative_zero(s: String) -> String {
    if s.starts_with('-') && s[1..].chars().all(|c| c == '0' || c == '.') {
        s[1..].to_string()
    } else {
        s
    }
}

/// "3e-4", "1.5e6": mantissa with `digits` decimals.
fn scientific(v: f64, digits: usize) -> String {
    format!("{:.*e}", digits, v)
}

fn si(v: f64, step: f64) -> String {
    let a = v.abs();
    let (div, suffix) = [(1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|&(d, _)| a >= d)
        .unwrap_or((1.0, ""));
    let s = no_negative_zero(trim_zeros(&format!(
        "{:.*}",
        decimals_for(step / div).min(6),
        v / div
    )));
    if s == "0" {
        s
    } else {
        format!("{s}{suffix}")
    }
}

fn log_label(v: f64) -> String {
    if !v.is_finite() || v <= 0.0 {
        return format!("{v}");
    }
    if !(1e-3..1e6).contains(&v) {
        let s = format!("{:.2e}", v);
        return match s.split_once('e') {
            Some((m, e)) => format!("{}e{}", trim_zeros(m), e),
            None => s,
        };
    }
    let decimals = (3.0 - v.log10().floor()).clamp(0.0, 8.0) as usize;
    trim_zeros(&format!("{:.*}", decimals, v))
}

/// Smallest 1/2/5 × 10^k step giving at most `max_count` intervals over `span`.
fn nice_step(span: f64, max_count: usize) -> f64 {
    let raw = span / max_count.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * mag)
}

/// Ticks at multiples of a nice step inside `[lo, hi]`. With `si` labels use
/// k/M/B suffixes.
pub(crate) fn linear_ticks(lo: f64, hi: f64, max_count: usize, si: bool) -> Ticks {
    let span = hi - lo;
    if !span.is_finite() || span <= 0.0 {
        return Ticks {
            values: vec![lo],
            format: TickFormat::Fixed(0),
        };
    }
    let step = nice_step(span, max_count);
    let (k0, k1) = ((lo / step).ceil(), (hi / step).floor());
    let values: Vec<f64> = if step > 0.0 && k1 >= k0 && k1 - k0 <= 1000.0 {
        (0..=(k1 - k0) as i64)
            .map(|i| {
                let v = (k0 + i as f64) * step;
                if v.abs() < step * 1e-9 {
                    0.0
                } else {
                    v
                }
            })
            .collect()
    } else {
        vec![lo, hi]
    };
    let max_abs = lo.abs().max(hi.abs());
    let format = if si {
        TickFormat::Si { step }
    } else if !(1e-3..1e6).contains(&max_abs) {
        TickFormat::Sci { step }
    } else {
        TickFormat::Fixed(decimals_for(step))
    };
    Ticks { values, format }
}

/// Ticks for a log axis over `[lo, hi]` (both > 0): decades, thinned when
/// there are too many, with 2× and 5× added when there are too few; a narrow
/// range falls back to linear ticks.
pub(crate) fn log_ticks(lo: f64, hi: f64, max_count: usize) -> Ticks {
    let max_count = max_count.max(2);
    let (a, b) = (lo.log10(), hi.log10());
    let in_range = |v: f64| v >= lo * (1.0 - 1e-9) && v <= hi * (1.0 + 1e-9);
    if !(a.is_finite() && b.is_finite() && b > a) {
        return Ticks {
            values: vec![lo],
            format: TickFormat::Log,
        };
    }
    // f64 spans at most ~630 decades, so these stay small.
    let (e0, e1) = ((a - 1e-9).ceil() as i32, (b + 1e-9).floor() as i32);
    let count = (e1 - e0 + 1).max(0) as usize;
    if count > max_count {
        let stride = count.div_ceil(max_count) as i32;
        let values = (e0..=e1)
            .filter(|e| e.rem_euclid(stride) == 0)
            .map(|e| 10f64.powi(e))
            .collect();
        return Ticks {
            values,
            format: TickFormat::Log,
        };
    }
    let decades: Vec<i32> = (e0..=e1).collect();
    if decades.len() >= 3 {
        return Ticks {
            values: decades.iter().map(|&e| 10f64.powi(e)).collect(),
            format: TickFormat::Log,
        };
    }
    let with_125: Vec<f64> = ((a.floor() as i32)..=(b.ceil() as i32))
        .flat_map(|e| [1.0, 2.0, 5.0].map(|m| m * 10f64.powi(e)))
        .filter(|&v| in_range(v))
        .collect();
    if with_125.len() >= 2 && with_125.len() <= max_count + 1 {
        return Ticks {
            values: with_125,
            format: TickFormat::Log,
        };
    }
    if with_125.len() > max_count + 1 && !decades.is_empty() {
        return Ticks {
            values: decades.iter().map(|&e| 10f64.powi(e)).collect(),
            format: TickFormat::Log,
        };
    }
    linear_ticks(lo, hi, max_count, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(t: &Ticks) -> Vec<String> {
        t.labels().collect()
    }

    #[test]
    fn linear() {
        let t = linear_ticks(-0.1, 3.1, 7, false);
        assert_eq!(
            labels(&t),
            ["0.0", "0.5", "1.0", "1.5", "2.0", "2.5", "3.0"]
        );
        let t = linear_ticks(-1.5e-5, 3.15e-4, 4, false);
        assert_eq!(labels(&t), ["0", "1e-4", "2e-4", "3e-4"]);
        let t = linear_ticks(-30.0, 3030.0, 7, false);
        assert_eq!(
            labels(&t),
            ["0", "500", "1000", "1500", "2000", "2500", "3000"]
        );
        let t = linear_ticks(0.0, 1_500_000.0, 8, true);
        assert_eq!(
            labels(&t),
            ["0", "200k", "400k", "600k", "800k", "1M", "1.2M", "1.4M"]
        );
    }

    #[test]
    fn log() {
        let t = log_ticks(1e-5, 10.0, 10);
        assert_eq!(
            labels(&t),
            ["1e-5", "1e-4", "0.001", "0.01", "0.1", "1", "10"]
        );
        let t = log_ticks(0.3, 4.0, 8);
        assert_eq!(labels(&t), ["0.5", "1", "2"]);
        let t = log_ticks(1.5, 1.9, 4);
        assert_eq!(t.format, TickFormat::Fixed(1));
    }

    #[test]
    fn si_labels() {
        assert_eq!(si(0.0, 1e5), "0");
        assert_eq!(si(250_000.0, 5e4), "250k");
        assert_eq!(si(1_250_000.0, 2.5e5), "1.25M");
        assert_eq!(si(2e9, 1e9), "2B");
        assert_eq!(si(-0.0, 1.0), "0");
    }
}
