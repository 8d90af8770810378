//! The quickstart end to end on the real default model and the bundled sample: training and
//! validation loss fall, and the held-out persona prompts go from (near) 0% to at least 90%
//! answered correctly. Wall time is reported in bench/RESULTS.md, not asserted here.

mod common;

use tunebench::train::{self, observer::Collect, RunConfig, TrainEvent, TrainOptions};

#[test]
fn quickstart_teaches_the_persona() {
    common::default_model();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = RunConfig::preset("quickstart").unwrap();
    cfg.output.dir = Some(tmp.path().join("run"));
    let mut events = Collect::default();
    let s = train::train(&cfg, &TrainOptions::default(), &mut events).unwrap();

    let before = s.heldout_before.expect("held-out score before training");
    let after = s.heldout_after.expect("held-out score after training");
    eprintln!("held-out: {}/{} before, {}/{} after", before.correct, before.total, after.correct, after.total);
    for a in after.answers.iter().filter(|a| !a.correct) {
        eprintln!("missed: {} => {}", a.prompt, a.answer);
    }
    assert!(before.accuracy() <= 0.1, "the base model should not know the persona: {}", before.accuracy());
    assert!(after.accuracy() >= 0.9, "after tuning: {}/{}", after.correct, after.total);

    // Losses fall: mean of the last 5 steps well below the first 5; validation too.
    let l = &s.losses;
    let head: f64 = l[..5].iter().sum::<f64>() / 5.0;
    let tail: f64 = l[l.len() - 5..].iter().sum::<f64>() / 5.0;
    assert!(tail < 0.6 * head, "train loss {head} -> {tail}");
    let (first_val, last_val) = (s.val_losses.first().unwrap().1, s.val_losses.last().unwrap().1);
    assert!(last_val < first_val, "val loss {first_val} -> {last_val}");

    // The adapter is on disk in PEFT's format and the events were reported in order.
    assert!(s.adapter_dir.join("adapter_model.safetensors").exists());
    assert!(s.adapter_dir.join("adapter_config.json").exists());
    assert!(events.0.iter().any(|e| matches!(e, TrainEvent::Started { .. })));
    assert!(matches!(events.0.last(), Some(TrainEvent::Finished { stopped: false, .. })));
    let steps = events.0.iter().filter(|e| matches!(e, TrainEvent::Step { .. })).count();
    assert_eq!(steps, s.steps);
}
