//! Series preprocessing: LTTB downsampling, EMA smoothing, cleaning and axis
//! ranges.

use super::{ChartSpec, LineStyle, Rgb, DEFAULT_MAX_POINTS};

/// Largest-Triangle-Three-Buckets downsampling (Steinarsson 2013) in O(n).
///
/// Returns at most `threshold` points, always including the first and the
/// last. The input is returned unchanged when `points.len() <= threshold` or
/// `threshold == 0`; `threshold == 1` keeps only the first point. Points are
/// expected to be sorted by x (they are not reordered).
pub fn lttb(points: &[(f64, f64)], threshold: usize) -> Vec<(f64, f64)> {
    let n = points.len();
    if threshold == 0 || n <= threshold {
        return points.to_vec();
    }
    if threshold == 1 {
        return vec![points[0]];
    }
    if threshold == 2 {
        return vec![points[0], points[n - 1]];
    }

    let mut out = Vec::with_capacity(threshold);
    out.push(points[0]);
    // The n-2 interior points are split into threshold-2 buckets.
    let every = (n - 2) as f64 / (threshold - 2) as f64;
    let bucket_start = |i: usize| ((i as f64 * every) as usize + 1).min(n - 1);
    let mut a = points[0];
    for i in 0..threshold - 2 {
        let (start, end) = (
            bucket_start(i),
            bucket_start(i + 1).max(bucket_start(i) + 1),
        );
        // Average of the next bucket (the last point for the last bucket).
        let (next_start, next_end) = if i + 1 < threshold - 2 {
            (end, bucket_start(i + 2).max(end + 1).min(n - 1))
        } else {
            (n - 1, n)
        };
        let next = &points[next_start..next_end.max(next_start + 1)];
        let inv = 1.0 / next.len() as f64;
        let (avg_x, avg_y) = next
            .iter()
            .fold((0.0, 0.0), |(sx, sy), p| (sx + p.0 * inv, sy + p.1 * inv));

        // Point of this bucket forming the largest triangle with `a` and the
        // next bucket's average (twice the area; the factor does not matter).
        let mut best = start;
        let mut best_area = -1.0;
        for (j, p) in points[start..end].iter().enumerate() {
            let area = ((a.0 - avg_x) * (p.1 - a.1) - (a.0 - p.0) * (avg_y - a.1)).abs();
            if area > best_area {
                best_area = area;
                best = start + j;
            }
        }
        a = points[best];
        out.push(a);
    }
    out.push(points[n - 1]);
    out
}

/// TensorBoard's debiased exponential moving average.
///
/// `smoothed_i = acc_i / (1 - weight^k)` with `acc_i = weight * acc_{i-1} +
/// (1 - weight) * y_i` and `k` the number of finite values seen so far, so the
/// first smoothed value equals the first raw value and there is no pull towards
/// zero at the start. Non-finite y values are passed through unchanged and do
/// not update the average. `weight <= 0` (or NaN) returns the input; weights
/// are clamped to 0.999. A series whose finite values are all equal is
/// returned unchanged (as TensorBoard does).
pub fn ema(points: &[(f64, f64)], weight: f64) -> Vec<(f64, f64)> {
    if weight.is_nan() || weight <= 0.0 {
        return points.to_vec();
    }
    let weight = weight.min(0.999);
    let mut finite = points.iter().map(|p| p.1).filter(|y| y.is_finite());
    let constant = match finite.next() {
        Some(first) => finite.all(|y| y == first),
        None => true,
    };
    if constant {
        return points.to_vec();
    }
    let mut acc = 0.0;
    let mut debias_pow = 1.0; // weight^k
    points
        .iter()
        .map(|&(x, y)| {
            if !y.is_finite() {
                return (x, y);
            }
            acc = acc * weight + (1.0 - weight) * y;
            // Once weight^k no longer changes 1 - weight^k, pin it to zero: left
            // alone it would sink into (slow) subnormal numbers and stay there.
            debias_pow = if debias_pow > f64::EPSILON {
                debias_pow * weight
            } else {
                0.0
            };
            (x, acc / (1.0 - debias_pow))
        })
        .collect()
}

/// A series ready to draw.
pub(crate) struct PreparedSeries {
    pub name: String,
    pub color: Rgb,
    pub style: LineStyle,
    /// The line to draw (smoothed when smoothing is on), downsampled.
    pub line: Vec<(f64, f64)>,
    /// The raw line drawn faint under a smoothed line, downsampled.
    pub raw: Option<Vec<(f64, f64)>>,
}

pub(crate) struct PreparedPanel {
    pub title: String,
    pub y_label: String,
    pub log_y: bool,
    /// Only series with at least one drawable point.
    pub series: Vec<PreparedSeries>,
    /// Padded y range.
    pub y_range: (f64, f64),
}

pub(crate) struct Prepared {
    pub panels: Vec<PreparedPanel>,
    /// Padded x range shared by all panels.
    pub x_range: (f64, f64),
}

/// Drops points that cannot be drawn.
fn clean(points: &[(f64, f64)], log_y: bool) -> Vec<(f64, f64)> {
    points
        .iter()
        .copied()
        .filter(|&(x, y)| x.is_finite() && y.is_finite() && (!log_y || y > 0.0))
        .collect()
}

fn min_max(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

fn clamp_finite(v: f64) -> f64 {
    v.clamp(-f64::MAX, f64::MAX)
}

/// Linear range with `frac` padding on both sides; degenerate ranges are
/// widened around their value.
pub(crate) fn pad_linear(lo: f64, hi: f64, frac: f64) -> (f64, f64) {
    let scale = lo.abs().max(hi.abs());
    // Inputs are finite, so the difference is never NaN (it may be +inf).
    if hi - lo <= scale * 1e-12 {
        let c = (lo + hi) / 2.0;
        let d = if c.abs() < 1e-300 { 1.0 } else { c.abs() * 0.1 };
        return (clamp_finite(c - d), clamp_finite(c + d));
    }
    let pad = hi * frac - lo * frac;
    (clamp_finite(lo - pad), clamp_finite(hi + pad))
}

/// Log range (both ends > 0) padded by `frac` of the decades spanned.
pub(crate) fn pad_log(lo: f64, hi: f64, frac: f64) -> (f64, f64) {
    let (llo, lhi) = (lo.log10(), hi.log10());
    let (lo, hi) = if lhi - llo <= 1e-9 {
        (lo / 2.0, hi * 2.0)
    } else {
        let pad = (lhi - llo) * frac;
        (10f64.powf(llo - pad), 10f64.powf(lhi + pad))
    };
    // Keep both ends finite, positive and apart.
    let lo = lo.clamp(f64::MIN_POSITIVE, f64::MAX / 4.0);
    (lo, hi.clamp(lo * 2.0, f64::MAX))
}

pub(crate) fn prepare(spec: &ChartSpec) -> Prepared {
    let max_points = if spec.max_points == 0 {
        DEFAULT_MAX_POINTS
    } else {
        spec.max_points
    };
    let smoothing = if spec.smoothing > 0.0 && spec.smoothing.is_finite() {
        spec.smoothing
    } else {
        0.0
    };
    let mut x_all: Option<(f64, f64)> = None;
    let merge = |acc: Option<(f64, f64)>, r: Option<(f64, f64)>| match (acc, r) {
        (Some(a), Some(b)) => Some((a.0.min(b.0), a.1.max(b.1))),
        (a, b) => a.or(b),
    };

    let panels = spec
        .panels
        .iter()
        .map(|panel| {
            let mut y_all: Option<(f64, f64)> = None;
            let series = panel
                .series
                .iter()
                .filter_map(|s| {
                    let pts = clean(&s.points, panel.log_y);
                    if pts.is_empty() {
                        return None;
                    }
                    x_all = merge(x_all, min_max(pts.iter().map(|p| p.0)));
                    y_all = merge(y_all, min_max(pts.iter().map(|p| p.1)));
                    let (line, raw) = if smoothing > 0.0 {
                        (
                            lttb(&ema(&pts, smoothing), max_points),
                            Some(lttb(&pts, max_points)),
                        )
                    } else {
                        (lttb(&pts, max_points), None)
                    };
                    Some(PreparedSeries {
                        name: s.name.clone(),
                        color: s.color,
                        style: s.style,
                        line,
                        raw,
                    })
                })
                .collect();
            let y_range = match (y_all, panel.log_y) {
                (Some((lo, hi)), false) => pad_linear(lo, hi, 0.05),
                (Some((lo, hi)), true) => pad_log(lo, hi, 0.05),
                (None, false) => (0.0, 1.0),
                (None, true) => (1.0, 10.0),
            };
            PreparedPanel {
                title: panel.title.clone(),
                y_label: panel.y_label.clone(),
                log_y: panel.log_y,
                series,
                y_range,
            }
        })
        .collect();

    let x_range = match x_all {
        Some((lo, hi)) => pad_linear(lo, hi, 0.01),
        None => (0.0, 1.0),
    };
    Prepared { panels, x_range }
}
