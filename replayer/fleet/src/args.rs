//! The clap flags of `reflex fleet index|query`, and [`run`].

use crate::location::Location;
use crate::query::Format;
use crate::reports::{Dialect, Params, Report, check_literal};

/// Fleet analysis: traces into a partitioned Parquet dataset, and SQL over it.
#[derive(Debug, clap::Args)]
pub struct FleetArgs {
    #[command(subcommand)]
    pub command: FleetCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum FleetCommand {
    /// Turn closed traces (a recorder folder, or what `reflex ship` put in a bucket) into a
    /// partitioned Parquet dataset; only traces not indexed yet are read.
    Index(IndexArgs),
    /// SQL over the dataset (table `acts`, one row per Act) with DataFusion, or a built-in report.
    Query(QueryArgs),
}

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Layout of DATASET: robot=<ID>/date=<YYYY-MM-DD>/model=<model_hash>/<trace name>.parquet, one \
Parquet file per trace file, the columns of `reflex trace export --to parquet` (README, \"Trace \
tools\"); robot, date and model are partition columns read from the path (Spark, DuckDB and \
DataFusion all read them so; Spark refuses a file that repeats them).

The robot of a trace is the robot=<ID> folder of its path (the layout `reflex ship` writes), \
else --robot. The date and model come from the path's date=/model= folders when it has them \
(nothing is read to decide), else from the trace's header (session start, UTC; model hash).

Incremental and idempotent: a trace whose Parquet file is already in DATASET is not read; a \
trace still being written (no footer yet) is left for a later run. Each Parquet file appears \
whole or not at all (renamed into place; one PUT for s3://).

S3 as the AWS tools: AWS_ENDPOINT_URL (or --endpoint), AWS_REGION, AWS_ACCESS_KEY_ID + \
AWS_SECRET_ACCESS_KEY or ~/.aws/credentials.

Exit codes: 0 every trace indexed (or already there, or not closed yet), 1 a trace could not \
be indexed (named, with slug=fleet-index-failed) or SRC/DATASET unusable, 64 usage error.")]
pub struct IndexArgs {
    /// Traces: a folder (searched recursively) or s3://BUCKET/PREFIX.
    #[arg(value_name = "SRC", value_parser = Location::parse)]
    pub src: Location,
    /// The dataset: a folder or s3://BUCKET/PREFIX.
    #[arg(long, value_name = "DATASET", value_parser = Location::parse)]
    pub to: Location,
    /// The robot of traces whose path has no robot=<ID> folder (a plain recorder folder).
    #[arg(long, value_name = "ID", value_parser = reflex_ship::args::parse_robot)]
    pub robot: Option<String>,
    /// S3 endpoint URL (default: AWS_ENDPOINT_URL, else AWS's own). http:// is allowed here.
    #[arg(long, env = "AWS_ENDPOINT_URL", value_name = "URL", value_parser = reflex_ship::args::parse_endpoint)]
    pub endpoint: Option<String>,
    /// Traces indexed at once (default: the number of CPUs, at most 8).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub jobs: Option<u32>,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "\
The table is `acts`: one row per Act, the columns of `reflex trace export --to parquet` plus \
the partition columns robot, date (YYYY-MM-DD) and model (= model_hash), all strings. \
Example: --sql \"SELECT model_hash, count(*) FROM acts WHERE date >= '2026-11-26' GROUP BY 1\".

Reports (--report; --since/--until prune by date): summary, latency, cache, errors, drift \
(--models A,B: pairs of Acts with the same episode_id and chunk_id under model A and model B, \
the Euclidean distance of their action chunks). `--print-sql` shows a report's SQL; DuckDB \
runs the same text (README, \"Fleet analysis\").

Exit codes: 0 done, 1 a query or dataset error (the engine's message), 64 usage error.")]
pub struct QueryArgs {
    /// The dataset written by `reflex fleet index`: a folder or s3://BUCKET/PREFIX.
    #[arg(value_name = "DATASET", value_parser = Location::parse)]
    pub dataset: Location,
    /// A SQL query over the table `acts`.
    #[arg(
        long,
        value_name = "QUERY",
        conflicts_with = "report",
        required_unless_present = "report"
    )]
    pub sql: Option<String>,
    /// A built-in report.
    #[arg(long, value_enum, value_name = "NAME")]
    pub report: Option<Report>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Only dates from this one on (YYYY-MM-DD), for reports.
    #[arg(long, value_name = "DATE", requires = "report")]
    pub since: Option<String>,
    /// Only dates up to this one (YYYY-MM-DD), for reports.
    #[arg(long, value_name = "DATE", requires = "report")]
    pub until: Option<String>,
    /// The two model hashes the drift report compares: A,B.
    #[arg(long, value_name = "A,B", value_parser = parse_models)]
    pub models: Option<(String, String)>,
    /// Print the report's SQL (DataFusion's dialect; `--print-sql duckdb` for DuckDB's) and exit.
    #[arg(long, value_name = "DIALECT", num_args = 0..=1, default_missing_value = "datafusion", value_parser = ["datafusion", "duckdb"], requires = "report")]
    pub print_sql: Option<String>,
    /// Memory the query engine may use (MiB); beyond it, sorts spill or the query fails.
    #[arg(long, value_name = "MIB", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(64..=1048576))]
    pub memory_limit_mb: u64,
    /// S3 endpoint URL (default: AWS_ENDPOINT_URL, else AWS's own). http:// is allowed here.
    #[arg(long, env = "AWS_ENDPOINT_URL", value_name = "URL", value_parser = reflex_ship::args::parse_endpoint)]
    pub endpoint: Option<String>,
}

fn parse_models(s: &str) -> Result<(String, String), String> {
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| format!("{s:?} is not two model hashes A,B"))?;
    check_literal("model hash", a)?;
    check_literal("model hash", b)?;
    Ok((a.to_string(), b.to_string()))
}

/// Runs `reflex fleet …`; the exit code.
pub async fn run(args: FleetArgs) -> anyhow::Result<i32> {
    match args.command {
        FleetCommand::Index(a) => {
            let jobs = a.jobs.map(|j| j as usize).unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
                    .min(8)
            });
            let report = crate::index::run(
                &a.src,
                &a.to,
                a.robot.as_deref(),
                a.endpoint.as_deref(),
                jobs,
            )
            .await?;
            println!("{}", report.summary_line());
            for (file, why) in &report.failed {
                eprintln!("not indexed: {file}: {why}");
            }
            Ok(if report.failed.is_empty() { 0 } else { 1 })
        }
        FleetCommand::Query(a) => {
            let sql = match (&a.sql, a.report) {
                (Some(sql), _) => sql.clone(),
                (None, Some(report)) => {
                    let params = Params {
                        since: a.since.clone(),
                        until: a.until.clone(),
                        models: a.models.clone(),
                    };
                    let dialect = match a.print_sql.as_deref() {
                        Some("duckdb") => Dialect::DuckDb,
                        _ => Dialect::DataFusion,
                    };
                    let sql = report
                        .sql(&params, dialect)
                        .map_err(|e| anyhow::anyhow!(e))?;
                    if a.print_sql.is_some() {
                        println!("{sql};");
                        return Ok(0);
                    }
                    sql
                }
                (None, None) => unreachable!("clap requires --sql or --report"),
            };
            let ctx = crate::query::context(
                &a.dataset,
                a.endpoint.as_deref(),
                a.memory_limit_mb as usize,
            )
            .await?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            crate::query::run_sql(&ctx, &sql, a.format, &mut out).await?;
            std::io::Write::flush(&mut out)?;
            Ok(0)
        }
    }
}
