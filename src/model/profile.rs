//! Where a training step's time goes: named regions of the forward, the backward and the
//! optimizer, timed when a profile is on (`tunebench bench-train --profile`) and free when it
//! is off (one thread-local flag read per region).
//!
//! A region synchronizes its device when it starts and when it ends, so on a GPU the time is
//! the kernels' own and not that of their launches; the price is that nothing overlaps across
//! region boundaries, so a profiled step is slower than an unprofiled one (the tokens/s of a
//! benchmark are measured without a profile). Regions nest; each is charged its *self* time
//! (its time less that of the regions inside it), so the rows add up to the time of the
//! outermost regions. The ops mark themselves: the forward of each training op where it is
//! called (`ops::rms_norm`, `ops::rope`, `ops::causal_attention`, `ops::swiglu`, the frozen
//! product, the adapters, the LM head and loss), and the backward of each op whose backward is
//! ours (the custom ops' `bwd`); what candle's own backward does (the adapters' matmuls,
//! residual adds, casts) is the self time of the `backward` region around it.
//!
//! The profile is per thread: regions on other threads (a chat worker, a server) are not
//! counted, and a profile taken on one thread sees only that thread's regions.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Instant;

use candle_core::Device;
use serde::Serialize;

/// One region's share of the profiled steps.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ProfileRow {
    /// The region (`attention fwd`, `frozen matmul bwd`, `backward` …).
    pub region: String,
    /// Self time per step, seconds.
    pub seconds_per_step: f64,
    /// Times entered per step.
    pub calls_per_step: f64,
    /// Self time over the time of all outermost regions.
    pub share: f64,
}

#[derive(Default)]
struct State {
    on: bool,
    /// Open regions: (start, seconds, time spent in regions inside it).
    stack: Vec<(f64, f64)>,
    /// Self seconds and calls per region.
    totals: HashMap<&'static str, (f64, u64)>,
    /// Time of the outermost regions.
    outer: f64,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
    /// A clock the tests move by hand.
    #[cfg(test)]
    static FAKE_NOW: std::cell::Cell<Option<f64>> = const { std::cell::Cell::new(None) };
}

/// Seconds since the first call (in tests, the hand-moved clock when one is set).
fn now() -> f64 {
    #[cfg(test)]
    if let Some(t) = FAKE_NOW.with(|c| c.get()) {
        return t;
    }
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_secs_f64()
}

/// Whether a profile is being taken on this thread.
pub fn enabled() -> bool {
    STATE.with(|s| s.borrow().on)
}

/// Starts a profile on this thread (forgetting any earlier one).
pub fn start() {
    STATE.with(|s| *s.borrow_mut() = State { on: true, ..State::default() });
}

/// Ends this thread's profile and returns its rows, largest first, with times divided by
/// `steps` (the number of steps profiled).
pub fn finish(steps: usize) -> Vec<ProfileRow> {
    let st = STATE.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let per = 1.0 / steps.max(1) as f64;
    let mut rows: Vec<ProfileRow> = st
        .totals
        .into_iter()
        .map(|(region, (secs, calls))| ProfileRow {
            region: region.to_string(),
            seconds_per_step: secs * per,
            calls_per_step: calls as f64 * per,
            share: if st.outer > 0.0 { secs / st.outer } else { 0.0 },
        })
        .collect();
    rows.sort_by(|a, b| b.seconds_per_step.total_cmp(&a.seconds_per_step).then_with(|| a.region.cmp(&b.region)));
    rows
}

/// Runs `f` as region `name` on `device`: timed (between two synchronizations of the device)
/// when a profile is on, run as is otherwise.
pub fn region<R>(name: &'static str, device: &Device, f: impl FnOnce() -> R) -> R {
    if !enabled() {
        return f();
    }
    // A failed synchronization would fail the op right after it too; the profile only times.
    let _ = device.synchronize();
    STATE.with(|s| s.borrow_mut().stack.push((now(), 0.0)));
    let out = f();
    let _ = device.synchronize();
    STATE.with(|s| {
        let mut st = s.borrow_mut();
        let Some((start, inner)) = st.stack.pop() else { return };
        let elapsed = now() - start;
        let e = st.totals.entry(name).or_insert((0.0, 0));
        e.0 += (elapsed - inner).max(0.0);
        e.1 += 1;
        match st.stack.last_mut() {
            Some(parent) => parent.1 += elapsed,
            None => st.outer += elapsed,
        }
    });
    out
}

/// The rows as a text table (region, ms per step, share, calls per step).
pub fn table(rows: &[ProfileRow]) -> String {
    let mut out = format!("{:<28} {:>12} {:>7} {:>8}\n", "region", "ms/step", "share", "calls");
    for r in rows {
        out += &format!("{:<28} {:>12.2} {:>6.1}% {:>8.0}\n", r.region, r.seconds_per_step * 1e3, r.share * 100.0, r.calls_per_step);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Moves the test clock on by `ms`.
    fn spend(ms: f64) {
        FAKE_NOW.with(|c| c.set(Some(c.get().unwrap_or(0.0) + ms * 1e-3)));
    }

    #[test]
    fn self_times_of_nested_regions_add_up_to_the_outer_ones() {
        let dev = Device::Cpu;
        spend(0.0);
        // Off: nothing is recorded.
        region("off", &dev, || spend(1.0));
        start();
        for _ in 0..2 {
            region("step", &dev, || {
                spend(4.0);
                region("inner", &dev, || {
                    spend(6.0);
                    region("leaf", &dev, || spend(3.0));
                });
                region("leaf", &dev, || spend(3.0));
            });
        }
        // Outside every region: not counted.
        spend(50.0);
        assert!(enabled());
        let rows = finish(2);
        assert!(!enabled());
        let get = |n: &str| rows.iter().find(|r| r.region == n).unwrap_or_else(|| panic!("no row {n}: {rows:?}"));
        assert!(rows.iter().all(|r| r.region != "off"));
        assert_eq!(get("leaf").calls_per_step, 2.0);
        assert_eq!(get("inner").calls_per_step, 1.0);
        // Self times per step: the step's own 4 ms, inner's 6 ms, two leaves of 3 ms.
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(get("leaf").seconds_per_step, 6e-3), "{rows:?}");
        assert!(close(get("inner").seconds_per_step, 6e-3), "{rows:?}");
        assert!(close(get("step").seconds_per_step, 4e-3), "{rows:?}");
        assert!(close(get("step").share, 0.25), "{rows:?}");
        let shares: f64 = rows.iter().map(|r| r.share).sum();
        assert!(close(shares, 1.0), "{rows:?}");
        // Largest first (ties by name).
        assert_eq!(rows.iter().map(|r| r.region.as_str()).collect::<Vec<_>>(), ["inner", "leaf", "step"]);
        assert_eq!(table(&rows).lines().count(), rows.len() + 1);
        // A new profile starts empty.
        start();
        assert!(finish(1).is_empty());
    }
}
