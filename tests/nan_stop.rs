//! A loss that becomes NaN stops the run with a clear message (and saves nothing from that
//! step), instead of training on garbage.

mod common;

use candle_core::Device;
use tunebench::model::{Llama, LlamaConfig};
use tunebench::train::{self, observer::NoObserver, RunConfig, TrainOptions};

#[test]
fn nan_loss_stops_the_run_with_advice() {
    let tok = tunebench::data::testing::tiny_tokenizer();
    let cfg = LlamaConfig::tiny(tok.get_vocab_size(true));
    let model = Llama::random(cfg.clone(), 1, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mdir = dir.path().join("model");
    std::fs::create_dir_all(&mdir).unwrap();
    common::write_folder(&mdir, &cfg, &model, false);
    // Poison one weight: every forward pass now yields NaN.
    let path = mdir.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let name = "model.layers.1.mlp.down_proj.weight";
    let w = t[name].clone();
    let nan = (w.ones_like().unwrap() * f64::NAN).unwrap();
    t.insert(name.to_string(), nan);
    candle_core::safetensors::save(&t, &path).unwrap();

    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, "{\"instruction\": \"a b\", \"output\": \"c d\"}\n{\"instruction\": \"b a\", \"output\": \"d c\"}\n").unwrap();
    let text = format!(
        "[model]\npath = \"{}\"\n[data]\npath = \"{}\"\nval_fraction = 0.0\n[train]\nmax_steps = 3\nbatch_size = 1\n[output]\ndir = \"{}\"\n",
        mdir.display(),
        data.display(),
        dir.path().join("run").display()
    );
    let rc = RunConfig::from_toml(&text, None).unwrap();
    let e = train::train(&rc, &TrainOptions::default(), &mut NoObserver).unwrap_err().to_string();
    assert!(e.contains("loss became NaN at step 1") && e.contains("train.lr"), "{e}");
    assert!(train::checkpoint::list(&dir.path().join("run/checkpoints")).is_empty(), "nothing may be saved");
}
