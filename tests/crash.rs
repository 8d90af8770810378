//! Runs survive anything: real workers (`tunebench worker train`) on the real default model,
//! SIGKILLed at random moments, and a supervisor process killed while its worker trains.
//!
//! After every kill: the database passes `PRAGMA integrity_check`, the run is `interrupted`,
//! every checkpoint folder on disk is complete, and the loss series holds each step from 1 to
//! at least the last checkpoint exactly once. Resuming completes the run with the same losses
//! as a run that was never interrupted.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tunebench::api::{CreateRun, Workbench, WorkbenchOptions};
use tunebench::store::{RunStatus, Store};
use tunebench::train::{checkpoint, RunConfig};

const STEPS: usize = 12;

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tunebench"))
}

fn config(name: &str) -> RunConfig {
    let text = format!(
        r#"
name = "{name}"
seed = 11
[model]
path = "{model}"
[data]
path = "{data}"
max_len = 48
val_fraction = 0.05
val_max = 4
[peft]
method = "lora"
r = 4
lora_alpha = 8
target_modules = ["q_proj", "v_proj"]
[train]
max_steps = {STEPS}
batch_size = 2
lr = 1e-3
warmup_steps = 2
save_steps = 2
eval_steps = 4
keep_checkpoints = 2
"#,
        model = common::default_model().display(),
        data = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/datasets/persona/train.jsonl"),
    );
    RunConfig::from_toml(&text, None).unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

async fn open(home: &Path, supervise: bool) -> Workbench {
    let mut o = WorkbenchOptions::new(home);
    o.supervise = supervise;
    o.worker_exe = Some(exe());
    o.stop_timeout = Duration::from_secs(120);
    Workbench::open(o).await.unwrap()
}

async fn wait_for(wb: &Workbench, id: i64, what: &str, f: impl Fn(&tunebench::store::RunRecord) -> bool) -> tunebench::store::RunRecord {
    let start = Instant::now();
    loop {
        let r = wb.store().run(id).await.unwrap();
        if f(&r) {
            return r;
        }
        assert!(start.elapsed() < Duration::from_secs(300), "timed out waiting for {what}; run is {:?} ({:?})", r.status, r.error);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every checkpoint folder is complete (loadable); no step is recorded twice; every step from
/// 1 to the newest recorded checkpoint is present.
async fn check_consistent(store: &Store, id: i64, out_dir: &Path) -> i64 {
    assert_eq!(store.integrity_check().await.unwrap(), "ok");
    for (step, dir) in checkpoint::list(&out_dir.join("checkpoints")) {
        let ck = checkpoint::load(&dir, &candle_core::Device::Cpu)
            .unwrap_or_else(|e| panic!("checkpoint {} is not complete: {e}", dir.display()));
        assert_eq!(ck.state.step, step);
        assert!(ck.adapter_dir.join("adapter_model.safetensors").is_file());
    }
    let loss = store.series(id, "loss").await.unwrap();
    let steps: Vec<i64> = loss.iter().map(|p| p.step).collect();
    let expected: Vec<i64> = (1..=steps.len() as i64).collect();
    assert_eq!(steps, expected, "loss steps are 1..=n without gaps or duplicates");
    let last_ckpt = store.checkpoints(id).await.unwrap().into_iter().filter(|c| !c.removed).map(|c| c.step).max().unwrap_or(0);
    assert!(steps.len() as i64 >= last_ckpt, "metrics up to the last checkpoint ({last_ckpt}) are all there: {steps:?}");
    last_ckpt
}

#[test]
fn sigkilled_workers_lose_nothing_and_resume_exactly() {
    let home = tempfile::tempdir().unwrap();
    let rt = rt();
    rt.block_on(async {
        let wb = open(home.path(), true).await;

        // The reference: the same config, never interrupted.
        let reference = wb.create_run(CreateRun { config: config("reference"), dataset_id: None, device: "cpu".into() }).await.unwrap();
        let r = wb.wait_run(reference.id, Duration::from_secs(600)).await.unwrap();
        assert_eq!(r.status, RunStatus::Completed, "{:?}", r.error);
        let ref_loss: Vec<f64> = wb.metrics(reference.id, "loss").await.unwrap().iter().map(|p| p.value).collect();
        assert_eq!(ref_loss.len(), STEPS);

        let run = wb.create_run(CreateRun { config: config("crashy"), dataset_id: None, device: "cpu".into() }).await.unwrap();
        let out_dir = PathBuf::from(&run.out_dir);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5EED);
        let mut kills = 0;
        let mut last_ckpt = 0;
        // Kill at a random moment after reaching steps 0 (model loading), 3, 6 and 9: inside a
        // step, an evaluation, a checkpoint write or start-up.
        for min_step in [0i64, 3, 6, 9] {
            let r = wait_for(&wb, run.id, "the worker to start", |r| r.status == RunStatus::Running && r.worker_pid.is_some() && r.step >= min_step).await;
            let pid = r.worker_pid.unwrap();
            let delay = rng.random_range(0..600);
            tokio::time::sleep(Duration::from_millis(delay)).await;
            // SAFETY: kill(2) on our own child worker.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            kills += 1;
            let r = wait_for(&wb, run.id, "the supervisor to mark the run", |r| r.status != RunStatus::Running).await;
            assert_eq!(r.status, RunStatus::Interrupted, "after SIGKILL at step {min_step} + {delay} ms: {:?}", r.error);
            assert!(r.error.as_deref().unwrap_or("").contains("killed"), "{:?}", r.error);
            let ckpt = check_consistent(wb.store(), run.id, &out_dir).await;
            eprintln!("kill {kills} at step {} (+{delay} ms): last checkpoint {ckpt}", r.step);
            assert!(r.step >= ckpt && ckpt >= last_ckpt, "the newest checkpoint never goes back ({last_ckpt} -> {ckpt}, step {})", r.step);
            last_ckpt = ckpt;
            wb.resume_run(run.id).await.unwrap();
        }
        assert_eq!(kills, 4);
        let r = wb.wait_run(run.id, Duration::from_secs(600)).await.unwrap();
        assert_eq!(r.status, RunStatus::Completed, "{:?}", r.error);
        check_consistent(wb.store(), run.id, &out_dir).await;
        let loss: Vec<f64> = wb.metrics(run.id, "loss").await.unwrap().iter().map(|p| p.value).collect();
        assert_eq!(loss.len(), STEPS);
        for (i, (a, b)) in loss.iter().zip(&ref_loss).enumerate() {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "step {}: resumed loss {a} vs uninterrupted {b}", i + 1);
        }
        assert!(out_dir.join("adapter/adapter_model.safetensors").is_file());
        // No half-written folders are left behind.
        let partial: Vec<_> = std::fs::read_dir(out_dir.join("checkpoints")).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with('.')).collect();
        assert!(partial.is_empty(), "half-written or half-deleted checkpoint folders are cleaned up: {partial:?}");
    });
}

fn spawn_queue(home: &Path) -> std::process::Child {
    Command::new(exe())
        .arg("queue")
        .env("TUNEBENCH_HOME", home)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

#[test]
fn a_killed_supervisor_leaves_runs_recoverable() {
    let home = tempfile::tempdir().unwrap();
    let rt = rt();
    rt.block_on(async {
        // Queue two runs with no supervisor, then start one as its own process.
        let wb = open(home.path(), false).await;
        let a = wb.create_run(CreateRun { config: config("a"), dataset_id: None, device: "cpu".into() }).await.unwrap();
        let b = wb.create_run(CreateRun { config: config("b"), dataset_id: None, device: "cpu".into() }).await.unwrap();
        let mut sup = spawn_queue(home.path());
        let r = wait_for(&wb, a.id, "run a to start", |r| r.status == RunStatus::Running && r.step >= 1).await;
        assert_eq!(wb.store().run(b.id).await.unwrap().status, RunStatus::Queued, "one training job per device");
        let worker_a = r.worker_pid.unwrap();

        // Kill the supervisor: the worker (its own process group) trains on.
        sup.kill().unwrap();
        sup.wait().unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(tunebench::api::worker::process_alive(worker_a, r.worker_start), "the worker survives its supervisor");
        assert_eq!(wb.store().integrity_check().await.unwrap(), "ok");

        // A new supervisor re-attaches: run a completes, then the queue starts run b.
        let wb2 = open(home.path(), true).await;
        let ra = wb2.wait_run(a.id, Duration::from_secs(600)).await.unwrap();
        assert_eq!(ra.status, RunStatus::Completed, "{:?}", ra.error);
        let rb = wait_for(&wb2, b.id, "run b to start", |r| r.status == RunStatus::Running && r.step >= 1).await;
        drop(wb2);

        // Kill the worker while no supervisor watches: the next one marks the run interrupted.
        // SAFETY: kill(2) on a worker this test started through the queue.
        unsafe { libc::kill(rb.worker_pid.unwrap() as i32, libc::SIGKILL) };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let wb3 = open(home.path(), false).await;
        let rb = wb3.store().run(b.id).await.unwrap();
        assert_eq!(rb.status, RunStatus::Interrupted);
        check_consistent(wb3.store(), b.id, Path::new(&rb.out_dir)).await;

        // And it resumes to the end, in the foreground path the CLI uses.
        let out = Command::new(exe()).args(["runs", "resume", &b.id.to_string(), "--json"]).env("TUNEBENCH_HOME", home.path()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let rb = wb3.store().run(b.id).await.unwrap();
        assert_eq!(rb.status, RunStatus::Completed);
        assert_eq!(wb3.metrics(b.id, "loss").await.unwrap().len(), STEPS);
    });
}

#[test]
fn graceful_stop_checkpoints_and_resumes() {
    let home = tempfile::tempdir().unwrap();
    let rt = rt();
    rt.block_on(async {
        let wb = open(home.path(), true).await;
        let mut events = wb.subscribe();
        let run = wb.create_run(CreateRun { config: config("stoppable"), dataset_id: None, device: "cpu".into() }).await.unwrap();
        wait_for(&wb, run.id, "3 steps", |r| r.status == RunStatus::Running && r.step >= 3).await;
        let status = wb.stop_run(run.id).await.unwrap();
        assert_eq!(status, RunStatus::Stopped);
        let r = wb.store().run(run.id).await.unwrap();
        let ckpts = wb.store().checkpoints(run.id).await.unwrap();
        assert_eq!(ckpts.last().map(|c| c.step), Some(r.step), "the stop wrote a checkpoint at the last step");
        // Live events arrived from the worker's stdout.
        let mut steps = 0;
        while let Ok(ev) = events.try_recv() {
            if let tunebench::api::ApiEvent::Train { event: tunebench::train::TrainEvent::Step { .. }, .. } = ev {
                steps += 1;
            }
        }
        assert!(steps >= 3, "step events were streamed ({steps})");
        // Resumed at once: the stopped worker's exit may be seen after the run is queued again.
        wb.resume_run(run.id).await.unwrap();
        let r = wb.wait_run(run.id, Duration::from_secs(600)).await.unwrap();
        assert_eq!(r.status, RunStatus::Completed, "{:?}", r.error);
        check_consistent(wb.store(), run.id, Path::new(&r.out_dir)).await;
        assert_eq!(r.step as usize, STEPS);
        // The base model was registered with its size, and the run points at it.
        let models = wb.store().models().await.unwrap();
        assert_eq!(models.len(), 1);
        assert_eq!((models[0].kind.as_str(), models[0].params), ("gguf", Some(134_515_008)));
        assert_eq!(r.model_id, Some(models[0].id));
    });
}

#[test]
fn a_worker_that_does_not_stop_in_time_is_killed() {
    let home = tempfile::tempdir().unwrap();
    let rt = rt();
    rt.block_on(async {
        let mut o = WorkbenchOptions::new(home.path());
        o.supervise = true;
        o.worker_exe = Some(exe());
        // No time to finish the step and write a checkpoint: the stop is forced.
        o.stop_timeout = Duration::ZERO;
        let wb = Workbench::open(o).await.unwrap();
        let run = wb.create_run(CreateRun { config: config("stubborn"), dataset_id: None, device: "cpu".into() }).await.unwrap();
        let r = wait_for(&wb, run.id, "a step", |r| r.status == RunStatus::Running && r.step >= 1).await;
        let status = wb.stop_run(run.id).await.unwrap();
        assert_eq!(status, RunStatus::Interrupted);
        let now = wb.store().run(run.id).await.unwrap();
        assert!(now.error.as_deref().unwrap_or("").contains("did not stop"), "{:?}", now.error);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!tunebench::api::worker::process_alive(r.worker_pid.unwrap(), r.worker_start), "the worker is gone");
        check_consistent(wb.store(), run.id, Path::new(&now.out_dir)).await;
    });
}
