//! Evaluation results of a run's checkpoints (`tunebench eval`): scores as metrics named
//! `eval_*` at the checkpoint's step, and the generated answers with their references as
//! samples of source `eval`. Evaluating the same step again replaces its results.

use serde::{Deserialize, Serialize};

use super::{now_ms, Store};
use crate::Result;

/// One evaluated answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalSampleRecord {
    /// The checkpoint's step.
    pub step: i64,
    /// The prompt (the conversation before the answer, as text).
    pub prompt: String,
    /// The reference answer from the dataset.
    pub reference: String,
    /// The generated answer.
    pub output: String,
}

impl Store {
    /// Records an evaluation of `run_id` at `step` in one transaction, replacing an earlier
    /// evaluation of the same step.
    pub async fn record_eval(&self, run_id: i64, step: i64, metrics: &[(String, f64)], samples: &[EvalSampleRecord]) -> Result<()> {
        let mut tx = self.pool().begin().await.map_err(|e| self.err(e))?;
        let now = now_ms();
        for (name, value) in metrics {
            // Tokens and wall time of the training step evaluated (0 when it has none recorded).
            sqlx::query(
                "INSERT OR REPLACE INTO metrics (run_id, name, step, tokens, wall_s, value)
                 SELECT ?1, ?2, ?3, COALESCE(MAX(tokens), 0), COALESCE(MAX(wall_s), 0), ?4
                 FROM metrics WHERE run_id = ?1 AND name = 'loss' AND step = ?3",
            )
            .bind(run_id)
            .bind(name)
            .bind(step)
            .bind(value)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
        }
        sqlx::query("DELETE FROM samples WHERE run_id = ? AND step = ? AND source = 'eval'")
            .bind(run_id)
            .bind(step)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        for s in samples {
            sqlx::query("INSERT INTO samples (run_id, step, prompt, output, created_at, source, reference) VALUES (?, ?, ?, ?, ?, 'eval', ?)")
                .bind(run_id)
                .bind(s.step)
                .bind(&s.prompt)
                .bind(&s.output)
                .bind(now)
                .bind(&s.reference)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
        }
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Every evaluated answer of a run, by step.
    pub async fn eval_samples(&self, run_id: i64) -> Result<Vec<EvalSampleRecord>> {
        let rows: Vec<(i64, String, Option<String>, String)> =
            sqlx::query_as("SELECT step, prompt, reference, output FROM samples WHERE run_id = ? AND source = 'eval' ORDER BY step, id")
                .bind(run_id)
                .fetch_all(self.pool())
                .await
                .map_err(|e| self.err(e))?;
        Ok(rows
            .into_iter()
            .map(|(step, prompt, reference, output)| EvalSampleRecord { step, prompt, reference: reference.unwrap_or_default(), output })
            .collect())
    }
}
