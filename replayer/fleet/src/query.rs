//! `reflex fleet query DATASET`: SQL over the dataset with DataFusion, embedded.
//!
//! The table `acts` is a listing table over `DATASET/**/*.parquet` with the trace tools'
//! schema (given, not inferred: thousands of files are not opened to plan) and the partition
//! columns `robot`, `date`, `model` (strings) read from the paths, so a `WHERE date >= …` or
//! `robot = …` prunes files before any is read. Memory is capped (`--memory-limit-mb`):
//! sorts and aggregations beyond it spill to a temporary folder or fail with a clear error,
//! never take the machine. Results stream out batch by batch for csv and json.

use std::io::Write;
use std::sync::Arc;

use anyhow::{Context, bail};
use arrow::array::RecordBatch;
use datafusion::arrow::datatypes::DataType;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use futures::StreamExt;

use crate::location::{Bucket, Location};

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An aligned text table.
    Table,
    /// One JSON array of objects.
    Json,
    /// CSV with a header line.
    Csv,
}

/// A session with `acts` registered over `dataset`.
pub async fn context(
    dataset: &Location,
    endpoint: Option<&str>,
    memory_limit_mb: usize,
) -> anyhow::Result<SessionContext> {
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_limit(memory_limit_mb << 20, 1.0)
        .build_arc()
        .context("setting up the query engine")?;
    let config = SessionConfig::new().with_information_schema(true);
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    let url = match dataset {
        Location::Local(dir) => {
            if !dir.is_dir() {
                bail!(
                    "{} is not a dataset folder (create one with `reflex fleet index SRC --to {}`)",
                    dir.display(),
                    dir.display()
                );
            }
            let abs = dir
                .canonicalize()
                .with_context(|| format!("resolving {}", dir.display()))?;
            format!("file://{}/", abs.display())
        }
        Location::S3(d) => {
            let bucket = Bucket::open(d, endpoint)?;
            let root = url::Url::parse(&format!("s3://{}", d.bucket))?;
            ctx.register_object_store(&root, bucket.store.clone());
            if d.prefix.is_empty() {
                format!("s3://{}/", d.bucket)
            } else {
                format!("s3://{}/{}/", d.bucket, d.prefix)
            }
        }
    };
    let table_url =
        ListingTableUrl::parse(&url).with_context(|| format!("the dataset URL {url}"))?;
    let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
        .with_file_extension(".parquet")
        .with_table_partition_cols(vec![
            ("robot".into(), DataType::Utf8),
            ("date".into(), DataType::Utf8),
            ("model".into(), DataType::Utf8),
        ]);
    let config = ListingTableConfig::new(table_url)
        .with_listing_options(options)
        .with_schema(reflex_tracetools::table::schema());
    let table = ListingTable::try_new(config).context("opening the dataset")?;
    ctx.register_table("acts", Arc::new(table))
        .context("registering the table acts")?;
    Ok(ctx)
}

/// Runs `sql` and writes its result to `out` in `format`; returns the number of rows.
pub async fn run_sql(
    ctx: &SessionContext,
    sql: &str,
    format: Format,
    out: &mut dyn Write,
) -> anyhow::Result<u64> {
    let df = ctx.sql(sql).await?;
    let mut rows = 0u64;
    match format {
        Format::Table => {
            let batches = df.collect().await?;
            rows = batches.iter().map(|b| b.num_rows() as u64).sum();
            let text = arrow::util::pretty::pretty_format_batches(&batches)?;
            writeln!(out, "{text}")?;
        }
        Format::Csv => {
            let mut stream = df.execute_stream().await?;
            let mut w = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(out);
            let mut any = false;
            while let Some(b) = stream.next().await {
                let b: RecordBatch = b?;
                rows += b.num_rows() as u64;
                w.write(&b)?;
                any = true;
            }
            if !any {
                // No batch at all: still the header line.
                let schema = stream.schema();
                w.write(&RecordBatch::new_empty(schema))?;
            }
        }
        Format::Json => {
            let mut stream = df.execute_stream().await?;
            let mut w = arrow::json::ArrayWriter::new(out);
            while let Some(b) = stream.next().await {
                let b: RecordBatch = b?;
                rows += b.num_rows() as u64;
                w.write(&b)?;
            }
            // arrow's writer prints `[]` for no rows too.
            w.finish()?;
            let out = w.into_inner();
            writeln!(out)?;
        }
    }
    Ok(rows)
}
