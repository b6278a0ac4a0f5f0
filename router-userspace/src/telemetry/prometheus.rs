//! Prometheus telemetry: scrapes a vLLM, SGLang or DCGM-exporter `/metrics`
//! endpoint (text exposition format 0.0.4) and maps the metric names each
//! of them is known to export onto a [`Reading`].
//!
//! Selection rules, the same for every format:
//! - Only samples whose labels include every `key=value` of the source's
//!   label filter count; histograms and summaries are ignored.
//! - Request counts (running, waiting) are *summed* over the matching
//!   series: one engine with data-parallel ranks exports one series per rank,
//!   and the replica's queue is their total.
//! - Every other metric (fractions, per-GPU gauges) must match exactly one
//!   series. Several is an error naming the metric and the candidates:
//!   averaging them would silently blend GPUs (or replicas) that a narrower
//!   filter, e.g. `gpu="0"`, is meant to tell apart.
//! - A reading with none of the format's metrics is an error naming what was
//!   expected; a reading with some of them leaves the rest `None`.
//! - Every series read must be finite and not negative, checked before any
//!   sum, so one rank cannot cancel another's count.
//! - The result goes through [`Reading::validate`], so NaN, negative values
//!   and utilization above 100% are errors, never weights.

use std::{collections::BTreeMap, fmt, str::FromStr, time::Duration};

use prom_text_format_parser::{Labels, Type, ValueType};
use serde::{Deserialize, Serialize};

use super::{Reading, TelemetryError, http_client};

/// Largest `/metrics` body accepted. A vLLM scrape with every histogram is
/// well under 1 MiB; anything near this is not a metrics endpoint.
pub const MAX_BODY: usize = 4 << 20;

/// Bytes per MiB; DCGM reports framebuffer memory in MiB.
const MIB: f64 = 1024.0 * 1024.0;

/// How many candidate label sets an ambiguity error lists.
const SHOWN_CANDIDATES: usize = 4;

/// Which exporter's metric names to look for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromFormat {
    /// vLLM's `/metrics` (`vllm:` prefix).
    Vllm,
    /// SGLang's `/metrics` with `--enable-metrics` (`sglang:` prefix).
    Sglang,
    /// NVIDIA dcgm-exporter (`DCGM_FI_DEV_` fields).
    Dcgm,
}

impl PromFormat {
    /// The name used in configs and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            PromFormat::Vllm => "vllm",
            PromFormat::Sglang => "sglang",
            PromFormat::Dcgm => "dcgm",
        }
    }
}

impl fmt::Display for PromFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PromFormat {
    type Err = TelemetryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "vllm" => Ok(PromFormat::Vllm),
            "sglang" => Ok(PromFormat::Sglang),
            "dcgm" => Ok(PromFormat::Dcgm),
            other => Err(TelemetryError::Parse(format!(
                "unknown Prometheus format {other:?} (expected vllm, sglang or dcgm)"
            ))),
        }
    }
}

/// A Prometheus endpoint that reports on one backend.
#[derive(Clone, Debug)]
pub struct PrometheusSource {
    /// `http://host:port/metrics`.
    pub url: String,
    pub format: PromFormat,
    /// Every sample used must carry all of these labels with these values.
    pub labels: BTreeMap<String, String>,
    /// Keeps the connection to the endpoint open between polls.
    client: http_client::PooledClient,
}

impl PrometheusSource {
    pub fn new(
        url: impl Into<String>,
        format: PromFormat,
        labels: BTreeMap<String, String>,
    ) -> Self {
        Self {
            url: url.into(),
            format,
            labels,
            client: http_client::PooledClient::default(),
        }
    }

    /// Scrapes the endpoint once; the whole exchange must finish within
    /// `timeout` and the body must fit in [`MAX_BODY`].
    pub async fn read(&self, timeout: Duration) -> Result<Reading, TelemetryError> {
        let body = self.client.get(&self.url, timeout, MAX_BODY).await?;
        let text = std::str::from_utf8(&body)
            .map_err(|e| TelemetryError::Parse(format!("{}: body is not UTF-8: {e}", self.url)))?;
        parse(self.format, &self.labels, text)
    }
}

/// Where a metric's value goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    GpuUtil,
    MemUtil,
    MemUsed,
    MemFree,
    MemReserved,
    Power,
    Temperature,
    Running,
    Waiting,
    KvCache,
}

/// How several matching series of one metric combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Combine {
    Sum,
    Single,
}

/// One metric of a format: alternative names in order of preference (an
/// exporter renaming a metric may export both for a while), what to multiply
/// by to get the [`Reading`]'s unit, and where it goes.
struct Spec {
    names: &'static [&'static str],
    scale: f64,
    combine: Combine,
    field: Field,
}

const VLLM: &[Spec] = &[
    Spec {
        names: &["vllm:num_requests_running"],
        scale: 1.0,
        combine: Combine::Sum,
        field: Field::Running,
    },
    Spec {
        names: &["vllm:num_requests_waiting"],
        scale: 1.0,
        combine: Combine::Sum,
        field: Field::Waiting,
    },
    // The V1 engine renamed the gauge; both are a 0–1 fraction despite
    // "perc" in the name.
    Spec {
        names: &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
        scale: 1.0,
        combine: Combine::Single,
        field: Field::KvCache,
    },
];

const SGLANG: &[Spec] = &[
    Spec {
        names: &["sglang:num_running_reqs"],
        scale: 1.0,
        combine: Combine::Sum,
        field: Field::Running,
    },
    Spec {
        names: &["sglang:num_queue_reqs"],
        scale: 1.0,
        combine: Combine::Sum,
        field: Field::Waiting,
    },
    // Fraction of the KV/token pool in use, 0–1.
    Spec {
        names: &["sglang:token_usage"],
        scale: 1.0,
        combine: Combine::Single,
        field: Field::KvCache,
    },
];

const DCGM: &[Spec] = &[
    // Percent.
    Spec {
        names: &["DCGM_FI_DEV_GPU_UTIL"],
        scale: 0.01,
        combine: Combine::Single,
        field: Field::GpuUtil,
    },
    Spec {
        names: &["DCGM_FI_DEV_MEM_COPY_UTIL"],
        scale: 0.01,
        combine: Combine::Single,
        field: Field::MemUtil,
    },
    // MiB.
    Spec {
        names: &["DCGM_FI_DEV_FB_USED"],
        scale: MIB,
        combine: Combine::Single,
        field: Field::MemUsed,
    },
    Spec {
        names: &["DCGM_FI_DEV_FB_FREE"],
        scale: MIB,
        combine: Combine::Single,
        field: Field::MemFree,
    },
    // Newer drivers keep some framebuffer reserved; it belongs to the total
    // as NVML counts it.
    Spec {
        names: &["DCGM_FI_DEV_FB_RESERVED"],
        scale: MIB,
        combine: Combine::Single,
        field: Field::MemReserved,
    },
    // Watts.
    Spec {
        names: &["DCGM_FI_DEV_POWER_USAGE"],
        scale: 1.0,
        combine: Combine::Single,
        field: Field::Power,
    },
    Spec {
        names: &["DCGM_FI_DEV_GPU_TEMP"],
        scale: 1.0,
        combine: Combine::Single,
        field: Field::Temperature,
    },
];

fn specs(format: PromFormat) -> &'static [Spec] {
    match format {
        PromFormat::Vllm => VLLM,
        PromFormat::Sglang => SGLANG,
        PromFormat::Dcgm => DCGM,
    }
}

/// One plain (counter, gauge or untyped) sample.
struct Series<'a> {
    name: &'a str,
    labels: &'a Labels,
    value: &'a str,
}

/// Parses a scrape in `format` and keeps only samples matching `labels`.
pub fn parse(
    format: PromFormat,
    labels: &BTreeMap<String, String>,
    text: &str,
) -> Result<Reading, TelemetryError> {
    if text.trim().is_empty() {
        return Err(TelemetryError::Parse("empty body".into()));
    }
    // The parser takes only `\n` line ends.
    let text = if text.contains('\r') {
        std::borrow::Cow::Owned(text.replace("\r\n", "\n"))
    } else {
        std::borrow::Cow::Borrowed(text)
    };
    // The second half lists structural complaints such as a family with
    // HELP/TYPE and no sample yet, which the format allows (a labelled
    // metric before its first observation); lines that do not parse fail
    // the first half, so every value used was read in full.
    let (metrics, structure) = prom_text_format_parser::parse_scrape(&text);
    if let Some(prom_text_format_parser::ScrapeParseError::Parse(msg)) = structure {
        return Err(TelemetryError::Parse(one_line(&msg)));
    }
    let series: Vec<Series<'_>> = metrics
        .iter()
        .filter(|m| matches!(m.kind, Type::Counter | Type::Gauge | Type::Untyped))
        .flat_map(|m| {
            m.samples
                .iter()
                .filter(|s| s.value.value_type == ValueType::Sample)
                .map(|s| Series {
                    name: m.name.as_str(),
                    labels: &s.labels,
                    value: s.value.value.as_str(),
                })
        })
        .collect();

    let mut reading = Reading::default();
    let mut free = None;
    let mut reserved = None;
    let mut found = false;
    for spec in specs(format) {
        let Some(value) = lookup(&series, spec, labels)? else {
            continue;
        };
        found = true;
        let value = value * spec.scale;
        match spec.field {
            Field::GpuUtil => reading.gpu_util = Some(value),
            Field::MemUtil => reading.mem_util = Some(value),
            Field::MemUsed => reading.mem_used_bytes = Some(value),
            Field::MemFree => free = Some(value),
            Field::MemReserved => reserved = Some(value),
            Field::Power => reading.power_watts = Some(value),
            Field::Temperature => reading.temperature_c = Some(value),
            Field::Running => reading.requests_running = Some(value),
            Field::Waiting => reading.requests_waiting = Some(value),
            Field::KvCache => reading.kv_cache_usage = Some(value),
        }
    }
    if !found {
        return Err(TelemetryError::Invalid(format!(
            "no {format} metric matched{}: expected any of {}",
            describe_filter(labels),
            specs(format)
                .iter()
                .flat_map(|s| s.names.iter().copied())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    // A negative free or reserved amount would otherwise only surface as a
    // confusing "used exceeds total".
    super::finite_nonneg("DCGM_FI_DEV_FB_FREE", free)?;
    super::finite_nonneg("DCGM_FI_DEV_FB_RESERVED", reserved)?;
    if let (Some(used), Some(free)) = (reading.mem_used_bytes, free) {
        reading.mem_total_bytes = Some(used + free + reserved.unwrap_or(0.0));
    }
    reading.validate()?;
    Ok(reading)
}

/// The value of `spec` among `series` under `filter`: `None` if no name of
/// it has a matching sample.
fn lookup(
    series: &[Series<'_>],
    spec: &Spec,
    filter: &BTreeMap<String, String>,
) -> Result<Option<f64>, TelemetryError> {
    for &name in spec.names {
        let matching: Vec<&Series<'_>> = series
            .iter()
            .filter(|s| s.name == name && matches_filter(s.labels, filter))
            .collect();
        if matching.is_empty() {
            continue;
        }
        if spec.combine == Combine::Single && matching.len() > 1 {
            let shown: Vec<String> = matching
                .iter()
                .take(SHOWN_CANDIDATES)
                .map(|s| s.labels.to_string())
                .collect();
            return Err(TelemetryError::Invalid(format!(
                "{} series of {name} match{}: {}{}; narrow the label filter to select one",
                matching.len(),
                describe_filter(filter),
                shown.join(" "),
                if matching.len() > SHOWN_CANDIDATES {
                    " ..."
                } else {
                    ""
                }
            )));
        }
        let mut total = 0.0;
        for s in matching {
            total += value_of(s)?;
        }
        return Ok(Some(total));
    }
    Ok(None)
}

fn value_of(s: &Series<'_>) -> Result<f64, TelemetryError> {
    // The parser checked the value against the exposition format's float
    // grammar (including NaN and ±Inf), which Rust's parser accepts too.
    let v = s.value.parse::<f64>().map_err(|e| {
        TelemetryError::Parse(format!("{}{}: value {:?}: {e}", s.name, s.labels, s.value))
    })?;
    // Checked per series, before any sum: every metric read here is a count,
    // a fraction or a physical amount, and a rank reporting -5 running must
    // not cancel another rank's 5 into a replica that looks idle.
    if !v.is_finite() || v < 0.0 {
        return Err(TelemetryError::Invalid(format!(
            "{}{} is {v}: a series must be finite and not negative",
            s.name, s.labels
        )));
    }
    Ok(v)
}

fn matches_filter(labels: &Labels, filter: &BTreeMap<String, String>) -> bool {
    filter.iter().all(|(key, want)| {
        labels
            .iter()
            .any(|l| &l.key == key && unescape(&l.value) == *want)
    })
}

/// Label values arrive as written, with `\\`, `\"` and `\n` escapes.
fn unescape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

fn describe_filter(filter: &BTreeMap<String, String>) -> String {
    if filter.is_empty() {
        return String::new();
    }
    let pairs: Vec<String> = filter.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!(" labels {{{}}}", pairs.join(","))
}

/// Parser messages quote the offending line under a caret drawing, over
/// several lines; a log wants one short line, and a garbage "line" can be
/// megabytes long or binary.
fn one_line(msg: &str) -> String {
    const MAX: usize = 300;
    let joined = msg
        .lines()
        .map(str::trim)
        .filter(|l| !l.chars().all(|c| matches!(c, '|' | '^' | ' ')))
        .collect::<Vec<_>>()
        .join(" | ");
    let mut out: String = joined
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(MAX)
        .collect();
    if joined.chars().count() > MAX {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests;
