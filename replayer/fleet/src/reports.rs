//! The built-in reports of `reflex fleet query --report NAME`: SQL over the table `acts`,
//! written in the dialect DataFusion and DuckDB share (`percentile_cont … WITHIN GROUP`,
//! window functions over aggregates), so the README's DuckDB queries are these texts. The
//! one difference, the Euclidean distance of two lists in `drift` (DataFusion
//! `array_distance`, DuckDB `list_distance`), is a parameter.
//!
//! Latency percentiles are exact (`percentile_cont`, linear interpolation), over the calls
//! that succeeded (a failed call has only a total). Every report is ordered by its keys, so
//! two engines' rows can be compared in order.

/// A built-in report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Report {
    /// Per model and robot: Acts, sessions, episodes, total latency p50/p99, cache hit rate, error rate.
    Summary,
    /// Per model and robot: p50/p99 of every latency stage (successful calls).
    Latency,
    /// Per model and robot: prefix-cache hits, misses and hit rate.
    Cache,
    /// Per model, robot and error slug: errors and their rate among the Acts.
    Errors,
    /// Action drift between two models (--models A,B) on the same episodes and chunks, per robot of A.
    Drift,
}

/// The SQL dialect a report is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    DataFusion,
    DuckDb,
}

/// What a report is asked for beside its name.
#[derive(Debug, Clone, Default)]
pub struct Params {
    /// Only partitions with `date >= since` (YYYY-MM-DD).
    pub since: Option<String>,
    /// Only partitions with `date <= until`.
    pub until: Option<String>,
    /// `drift`: the two model hashes (A, B).
    pub models: Option<(String, String)>,
}

/// A date or model hash checked for shape before it is put into SQL text.
pub fn check_literal(what: &str, v: &str) -> Result<(), String> {
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {v:?} is not 1-64 characters of [A-Za-z0-9_-]"
        ))
    }
}

fn filter(p: &Params) -> String {
    let mut w = vec!["TRUE".to_string()];
    if let Some(s) = &p.since {
        w.push(format!("date >= '{s}'"));
    }
    if let Some(u) = &p.until {
        w.push(format!("date <= '{u}'"));
    }
    w.join(" AND ")
}

fn percentiles(col: &str, name: &str) -> String {
    format!(
        "percentile_cont(0.5) WITHIN GROUP (ORDER BY {col}) AS {name}_p50_ms, \
         percentile_cont(0.99) WITHIN GROUP (ORDER BY {col}) AS {name}_p99_ms"
    )
}

impl Report {
    /// The report's SQL in `dialect`. `drift` needs `params.models`.
    pub fn sql(self, params: &Params, dialect: Dialect) -> Result<String, String> {
        for d in [&params.since, &params.until].into_iter().flatten() {
            check_literal("date", d)?;
        }
        let w = filter(params);
        Ok(match self {
            Report::Summary => format!(
                "SELECT model_hash, robot, count(*) AS acts, \
                   count(DISTINCT session_id) AS sessions, \
                   count(DISTINCT episode_id) AS episodes, \
                   {p}, \
                   CAST(sum(CASE WHEN cache_status = 'hit' THEN 1 ELSE 0 END) AS DOUBLE) \
                     / nullif(sum(CASE WHEN cache_status IN ('hit', 'miss') THEN 1 ELSE 0 END), 0) AS cache_hit_rate, \
                   CAST(sum(CASE WHEN error_slug IS NOT NULL THEN 1 ELSE 0 END) AS DOUBLE) / count(*) AS error_rate \
                 FROM acts WHERE {w} \
                 GROUP BY model_hash, robot ORDER BY model_hash, robot",
                p = percentiles(
                    "CASE WHEN error_slug IS NULL THEN latency_total_ms END",
                    "total"
                ),
            ),
            Report::Latency => {
                let stages = [
                    ("latency_total_ms", "total"),
                    ("latency_queue_ms", "queue"),
                    ("latency_decode_ms", "decode"),
                    ("latency_prefix_ms", "prefix"),
                    ("latency_denoise_ms", "denoise"),
                    ("latency_postprocess_ms", "postprocess"),
                ]
                .map(|(c, n)| percentiles(c, n))
                .join(", ");
                format!(
                    "SELECT model_hash, robot, count(*) AS acts, {stages} \
                     FROM acts WHERE error_slug IS NULL AND {w} \
                     GROUP BY model_hash, robot ORDER BY model_hash, robot"
                )
            }
            Report::Cache => format!(
                "SELECT model_hash, robot, count(*) AS acts, \
                   sum(CASE WHEN cache_status = 'hit' THEN 1 ELSE 0 END) AS hits, \
                   sum(CASE WHEN cache_status = 'miss' THEN 1 ELSE 0 END) AS misses, \
                   CAST(sum(CASE WHEN cache_status = 'hit' THEN 1 ELSE 0 END) AS DOUBLE) \
                     / nullif(sum(CASE WHEN cache_status IN ('hit', 'miss') THEN 1 ELSE 0 END), 0) AS hit_rate \
                 FROM acts WHERE {w} \
                 GROUP BY model_hash, robot ORDER BY model_hash, robot"
            ),
            Report::Errors => format!(
                "SELECT model_hash, robot, error_slug, errors, acts, CAST(errors AS DOUBLE) / acts AS rate \
                 FROM (SELECT model_hash, robot, error_slug, count(*) AS errors, \
                         sum(count(*)) OVER (PARTITION BY model_hash, robot) AS acts \
                       FROM acts WHERE {w} GROUP BY model_hash, robot, error_slug) AS t \
                 WHERE error_slug IS NOT NULL ORDER BY model_hash, robot, error_slug"
            ),
            Report::Drift => {
                let (a, b) = params.models.as_ref().ok_or(
                    "the drift report compares two models: --models A,B (their hashes: --report summary)",
                )?;
                check_literal("model hash", a)?;
                check_literal("model hash", b)?;
                // DuckDB 2.0.1's list_distance on FLOAT[] after a join reports NULL elements
                // that are not there; on DOUBLE[] it is right (DataFusion computes in f64 too).
                let dist = match dialect {
                    Dialect::DataFusion => "array_distance(a.actions, b.actions)",
                    Dialect::DuckDb => {
                        "list_distance(CAST(a.actions AS DOUBLE[]), CAST(b.actions AS DOUBLE[]))"
                    }
                };
                format!(
                    "SELECT a.robot, count(*) AS pairs, \
                       avg({dist}) AS l2_mean, \
                       percentile_cont(0.5) WITHIN GROUP (ORDER BY {dist}) AS l2_p50, \
                       max({dist}) AS l2_max \
                     FROM (SELECT robot, episode_id, chunk_id, actions FROM acts \
                           WHERE model_hash = '{a}' AND error_slug IS NULL AND {w}) AS a \
                     JOIN (SELECT episode_id, chunk_id, actions FROM acts \
                           WHERE model_hash = '{b}' AND error_slug IS NULL AND {w}) AS b \
                       ON a.episode_id = b.episode_id AND a.chunk_id = b.chunk_id \
                     WHERE array_length(a.actions) = array_length(b.actions) \
                     GROUP BY a.robot ORDER BY a.robot"
                )
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_that_could_break_out_of_sql_are_refused() {
        let p = Params {
            models: Some(("abc".into(), "x' OR 1=1 --".into())),
            ..Default::default()
        };
        assert!(Report::Drift.sql(&p, Dialect::DataFusion).is_err());
        let p = Params {
            since: Some("2026-01-01'".into()),
            ..Default::default()
        };
        assert!(Report::Summary.sql(&p, Dialect::DuckDb).is_err());
        assert!(
            Report::Drift
                .sql(&Params::default(), Dialect::DataFusion)
                .unwrap_err()
                .contains("--models")
        );
    }
}
