//! Parser tests on exposition text shaped like real vLLM, SGLang and
//! dcgm-exporter output, and scrape tests against local misbehaving servers.

use std::{collections::BTreeMap, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use super::*;

/// vLLM V0 (0.6.x): `gpu_cache_usage_perc`, one series per gauge, counters
/// with `_created` twins, histograms, python process metrics, and a labelled
/// counter that has no child yet (HELP/TYPE without samples).
const VLLM_V0: &str = r#"# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 18432.0
python_gc_objects_collected_total{generation="1"} 5120.0
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 3.4213888e+09
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",cpu_offload_gb="0",enable_prefix_caching="False",gpu_memory_utilization="0.9",num_cpu_blocks="2048",num_gpu_blocks="27910",sliding_window="None",swap_space_bytes="4294967296"} 1.0
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.0
# HELP vllm:num_requests_swapped Number of requests swapped to CPU.
# TYPE vllm:num_requests_swapped gauge
vllm:num_requests_swapped{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="meta-llama/Llama-3.1-8B-Instruct"} 2.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.4375
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{model_name="meta-llama/Llama-3.1-8B-Instruct"} 182736.0
# HELP vllm:prompt_tokens_created Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_created gauge
vllm:prompt_tokens_created{model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.7312345678e+09
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
vllm:time_to_first_token_seconds_bucket{le="0.005",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
vllm:time_to_first_token_seconds_bucket{le="0.04",model_name="meta-llama/Llama-3.1-8B-Instruct"} 41.0
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="meta-llama/Llama-3.1-8B-Instruct"} 57.0
vllm:time_to_first_token_seconds_count{model_name="meta-llama/Llama-3.1-8B-Instruct"} 57.0
vllm:time_to_first_token_seconds_sum{model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.8370001316070557
# HELP vllm:time_to_first_token_seconds_created Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds_created gauge
vllm:time_to_first_token_seconds_created{model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.7312345678e+09
"#;

/// vLLM V1 with two data-parallel engines: per-engine series and the
/// renamed `kv_cache_usage_perc`.
const VLLM_V1_DP: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen3-8B"} 5.0
vllm:num_requests_running{engine="1",model_name="Qwen/Qwen3-8B"} 4.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen3-8B"} 1.0
vllm:num_requests_waiting{engine="1",model_name="Qwen/Qwen3-8B"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen3-8B"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="Qwen/Qwen3-8B"} 0.5
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="Qwen/Qwen3-8B"} 120.5
vllm:e2e_request_latency_seconds_bucket{engine="0",le="1.0",model_name="Qwen/Qwen3-8B"} 10.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="Qwen/Qwen3-8B"} 30.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="Qwen/Qwen3-8B"} 30.0
"#;

/// SGLang (`--enable-metrics`): `_sum` before `_bucket`, as SGLang writes it.
const SGLANG: &str = r#"# HELP sglang:prompt_tokens_total Number of prefill tokens processed.
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{model_name="meta-llama/Llama-3.1-8B-Instruct"} 8.128902e+06
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="meta-llama/Llama-3.1-8B-Instruct"} 12.0
# HELP sglang:num_used_tokens The number of used tokens.
# TYPE sglang:num_used_tokens gauge
sglang:num_used_tokens{model_name="meta-llama/Llama-3.1-8B-Instruct"} 123859.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.28
# HELP sglang:gen_throughput The generation throughput (token/s).
# TYPE sglang:gen_throughput gauge
sglang:gen_throughput{model_name="meta-llama/Llama-3.1-8B-Instruct"} 86.50814177726902
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="meta-llama/Llama-3.1-8B-Instruct"} 2826.0
# HELP sglang:cache_hit_rate The prefix cache hit rate.
# TYPE sglang:cache_hit_rate gauge
sglang:cache_hit_rate{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.007507552643049313
# HELP sglang:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE sglang:time_to_first_token_seconds histogram
sglang:time_to_first_token_seconds_sum{model_name="meta-llama/Llama-3.1-8B-Instruct"} 2.3518979474117756e+06
sglang:time_to_first_token_seconds_bucket{le="0.001",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
sglang:time_to_first_token_seconds_bucket{le="+Inf",model_name="meta-llama/Llama-3.1-8B-Instruct"} 11008.0
sglang:time_to_first_token_seconds_count{model_name="meta-llama/Llama-3.1-8B-Instruct"} 11008.0
"#;

/// dcgm-exporter on a two-GPU node with Kubernetes pod mapping.
const DCGM_TWO_GPUS: &str = r#"# HELP DCGM_FI_DEV_SM_CLOCK SM clock frequency (in MHz).
# TYPE DCGM_FI_DEV_SM_CLOCK gauge
DCGM_FI_DEV_SM_CLOCK{gpu="0",UUID="GPU-5fd4a2c1-7d3e-4f6a-9b1c-2e8d7f6a5b4c",pci_bus_id="00000000:18:00.0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-node-1",DCGM_FI_DRIVER_VERSION="535.129.03",container="vllm",namespace="inference",pod="llama-0"} 1980
DCGM_FI_DEV_SM_CLOCK{gpu="1",UUID="GPU-0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d",pci_bus_id="00000000:2A:00.0",device="nvidia1",modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-node-1",DCGM_FI_DRIVER_VERSION="535.129.03",container="vllm",namespace="inference",pod="llama-1"} 1755
# HELP DCGM_FI_DEV_GPU_TEMP GPU temperature (in C).
# TYPE DCGM_FI_DEV_GPU_TEMP gauge
DCGM_FI_DEV_GPU_TEMP{gpu="0",UUID="GPU-5fd4a2c1-7d3e-4f6a-9b1c-2e8d7f6a5b4c",pci_bus_id="00000000:18:00.0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-node-1",DCGM_FI_DRIVER_VERSION="535.129.03",container="vllm",namespace="inference",pod="llama-0"} 61
DCGM_FI_DEV_GPU_TEMP{gpu="1",UUID="GPU-0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d",pci_bus_id="00000000:2A:00.0",device="nvidia1",modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-node-1",DCGM_FI_DRIVER_VERSION="535.129.03",container="vllm",namespace="inference",pod="llama-1"} 58
# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).
# TYPE DCGM_FI_DEV_POWER_USAGE gauge
DCGM_FI_DEV_POWER_USAGE{gpu="0",UUID="GPU-5fd4a2c1-7d3e-4f6a-9b1c-2e8d7f6a5b4c",pci_bus_id="00000000:18:00.0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-node-1",DCGM_FI_DRIVER_VERSION="535.129.03",container="vllm",namespace="inference",pod="llama-0"} 412.345
DCGM_FI_DEV_POWER_USAGE{gpu="1",UUID="GPU-0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d",pci_bus_id="00000000:2A:00.0",device="nvidia1",modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-node-1",DCGM_FI_DRIVER_VERSION="535.129.03",container="vllm",namespace="inference",pod="llama-1"} 98.5
# HELP DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION Total energy consumption since boot (in mJ).
# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter
DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="0",UUID="GPU-5fd4a2c1-7d3e-4f6a-9b1c-2e8d7f6a5b4c",pci_bus_id="00000000:18:00.0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-node-1",DCGM_FI_DRIVER_VERSION="535.129.03",container="vllm",namespace="inference",pod="llama-0"} 1204592882
DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="1",UUID="GPU-0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d",pci_bus_id="00000000:2A:00.0",device="nvidia1",modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-node-1",DCGM_FI_DRIVER_VERSION="535.129.03",container="vllm",namespace="inference",pod="llama-1"} 889201734
# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).
# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-5fd4a2c1-7d3e-4f6a-9b1c-2e8d7f6a5b4c",pci_bus_id="00000000:18:00.0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-node-1",DCGM_FI_DRIVER_VERSION="535.129.03",container="vllm",namespace="inference",pod="llama-0"} 87
DCGM_FI_DEV_GPU_UTIL{gpu="1",UUID="GPU-0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d",pci_bus_id="00000000:2A:00.0",device="nvidia1",modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-node-1",DCGM_FI_DRIVER_VERSION="535.129.03",container="vllm",namespace="inference",pod="llama-1"} 3
# HELP DCGM_FI_DEV_MEM_COPY_UTIL Memory utilization (in %).
# TYPE DCGM_FI_DEV_MEM_COPY_UTIL gauge
DCGM_FI_DEV_MEM_COPY_UTIL{gpu="0",UUID="GPU-5fd4a2c1-7d3e-4f6a-9b1c-2e8d7f6a5b4c",pci_bus_id="00000000:18:00.0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-node-1",DCGM_FI_DRIVER_VERSION="535.129.03",container="vllm",namespace="inference",pod="llama-0"} 41
DCGM_FI_DEV_MEM_COPY_UTIL{gpu="1",UUID="GPU-0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d",pci_bus_id="00000000:2A:00.0",device="nvidia1",modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-node-1",DCGM_FI_DRIVER_VERSION="535.129.03",container="vllm",namespace="inference",pod="llama-1"} 0
# HELP DCGM_FI_DEV_FB_FREE Framebuffer memory free (in MiB).
# TYPE DCGM_FI_DEV_FB_FREE gauge
DCGM_FI_DEV_FB_FREE{gpu="0",UUID="GPU-5fd4a2c1-7d3e-4f6a-9b1c-2e8d7f6a5b4c",pci_bus_id="00000000:18:00.0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-node-1",DCGM_FI_DRIVER_VERSION="535.129.03",container="vllm",namespace="inference",pod="llama-0"} 4012
DCGM_FI_DEV_FB_FREE{gpu="1",UUID="GPU-0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d",pci_bus_id="00000000:2A:00.0",device="nvidia1",modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-node-1",DCGM_FI_DRIVER_VERSION="535.129.03",container="vllm",namespace="inference",pod="llama-1"} 81000
# HELP DCGM_FI_DEV_FB_USED Framebuffer memory used (in MiB).
# TYPE DCGM_FI_DEV_FB_USED gauge
DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-5fd4a2c1-7d3e-4f6a-9b1c-2e8d7f6a5b4c",pci_bus_id="00000000:18:00.0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-node-1",DCGM_FI_DRIVER_VERSION="535.129.03",container="vllm",namespace="inference",pod="llama-0"} 77000
DCGM_FI_DEV_FB_USED{gpu="1",UUID="GPU-0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d",pci_bus_id="00000000:2A:00.0",device="nvidia1",modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-node-1",DCGM_FI_DRIVER_VERSION="535.129.03",container="vllm",namespace="inference",pod="llama-1"} 12
# HELP DCGM_FI_DEV_XID_ERRORS Value of the last XID error encountered.
# TYPE DCGM_FI_DEV_XID_ERRORS gauge
DCGM_FI_DEV_XID_ERRORS{gpu="0",UUID="GPU-5fd4a2c1-7d3e-4f6a-9b1c-2e8d7f6a5b4c",pci_bus_id="00000000:18:00.0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-node-1",DCGM_FI_DRIVER_VERSION="535.129.03",container="vllm",namespace="inference",pod="llama-0"} 0
DCGM_FI_DEV_XID_ERRORS{gpu="1",UUID="GPU-0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d",pci_bus_id="00000000:2A:00.0",device="nvidia1",modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-node-1",DCGM_FI_DRIVER_VERSION="535.129.03",container="vllm",namespace="inference",pod="llama-1"} 0
"#;

fn filter(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn close(a: Option<f64>, b: f64) -> bool {
    a.is_some_and(|a| (a - b).abs() < 1e-9 * b.abs().max(1.0))
}

#[test]
fn vllm_v0_gauges_are_read_and_the_rest_ignored() {
    let r = parse(PromFormat::Vllm, &BTreeMap::new(), VLLM_V0).unwrap();
    assert_eq!(
        r,
        Reading {
            requests_running: Some(7.0),
            requests_waiting: Some(2.0),
            kv_cache_usage: Some(0.4375),
            ..Reading::default()
        }
    );
    let by_model = filter(&[("model_name", "meta-llama/Llama-3.1-8B-Instruct")]);
    assert_eq!(parse(PromFormat::Vllm, &by_model, VLLM_V0).unwrap(), r);
}

#[test]
fn vllm_v1_counts_sum_over_engines_and_fractions_need_a_filter() {
    let err = parse(PromFormat::Vllm, &BTreeMap::new(), VLLM_V1_DP).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("2 series of vllm:kv_cache_usage_perc") && msg.contains("engine=\"1\""),
        "{msg}"
    );

    let r = parse(PromFormat::Vllm, &filter(&[("engine", "1")]), VLLM_V1_DP).unwrap();
    assert_eq!(r.requests_running, Some(4.0));
    assert_eq!(r.requests_waiting, Some(0.0));
    assert_eq!(r.kv_cache_usage, Some(0.5));

    // Without the KV gauge, the per-engine counts add up.
    let counts_only: String = VLLM_V1_DP
        .lines()
        .filter(|l| !l.contains("kv_cache_usage_perc"))
        .map(|l| format!("{l}\n"))
        .collect();
    let r = parse(PromFormat::Vllm, &BTreeMap::new(), &counts_only).unwrap();
    assert_eq!(r.requests_running, Some(9.0));
    assert_eq!(r.requests_waiting, Some(1.0));
    assert_eq!(r.kv_cache_usage, None);
}

#[test]
fn vllm_prefers_the_new_kv_name_when_both_exist() {
    let both = format!(
        "{VLLM_V0}# TYPE vllm:kv_cache_usage_perc gauge\n\
         vllm:kv_cache_usage_perc{{model_name=\"meta-llama/Llama-3.1-8B-Instruct\"}} 0.75\n"
    );
    let r = parse(PromFormat::Vllm, &BTreeMap::new(), &both).unwrap();
    assert_eq!(r.kv_cache_usage, Some(0.75));
}

#[test]
fn sglang_gauges_are_read() {
    let r = parse(
        PromFormat::Sglang,
        &filter(&[("model_name", "meta-llama/Llama-3.1-8B-Instruct")]),
        SGLANG,
    )
    .unwrap();
    assert_eq!(
        r,
        Reading {
            requests_running: Some(12.0),
            requests_waiting: Some(2826.0),
            kv_cache_usage: Some(0.28),
            ..Reading::default()
        }
    );
}

#[test]
fn dcgm_selects_one_gpu_and_converts_units() {
    let r = parse(PromFormat::Dcgm, &filter(&[("gpu", "0")]), DCGM_TWO_GPUS).unwrap();
    assert!(close(r.gpu_util, 0.87), "{r:?}");
    assert!(close(r.mem_util, 0.41), "{r:?}");
    assert!(close(r.mem_used_bytes, 77000.0 * 1048576.0), "{r:?}");
    assert!(close(r.mem_total_bytes, 81012.0 * 1048576.0), "{r:?}");
    assert!(close(r.power_watts, 412.345), "{r:?}");
    assert!(close(r.temperature_c, 61.0), "{r:?}");
    assert_eq!(r.requests_running, None);

    let by_pod = parse(
        PromFormat::Dcgm,
        &filter(&[("pod", "llama-1"), ("namespace", "inference")]),
        DCGM_TWO_GPUS,
    )
    .unwrap();
    assert!(close(by_pod.gpu_util, 0.03), "{by_pod:?}");
}

#[test]
fn dcgm_counts_reserved_memory_in_the_total() {
    let text = "DCGM_FI_DEV_FB_USED{gpu=\"0\"} 100\nDCGM_FI_DEV_FB_FREE{gpu=\"0\"} 50\n\
                DCGM_FI_DEV_FB_RESERVED{gpu=\"0\"} 10\n";
    let r = parse(PromFormat::Dcgm, &BTreeMap::new(), text).unwrap();
    assert!(close(r.mem_total_bytes, 160.0 * 1048576.0), "{r:?}");
}

#[test]
fn several_gpus_without_a_filter_are_ambiguous() {
    let msg = parse(PromFormat::Dcgm, &BTreeMap::new(), DCGM_TWO_GPUS)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("2 series of DCGM_FI_DEV_GPU_UTIL") && msg.contains("narrow the label filter"),
        "{msg}"
    );
}

#[test]
fn nothing_matching_names_what_was_expected() {
    let msg = parse(
        PromFormat::Vllm,
        &filter(&[("model_name", "other")]),
        VLLM_V0,
    )
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("no vllm metric matched labels {model_name=\"other\"}")
            && msg.contains("vllm:num_requests_running"),
        "{msg}"
    );
    // A DCGM scrape read as vLLM.
    let msg = parse(PromFormat::Vllm, &BTreeMap::new(), DCGM_TWO_GPUS)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("vllm:num_requests_waiting"), "{msg}");
    let msg = parse(PromFormat::Sglang, &BTreeMap::new(), "# just a comment\n")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("sglang:num_queue_reqs"), "{msg}");
}

#[test]
fn unparsable_bodies_are_parse_errors() {
    for text in [
        "vllm:num_requests_running 12abc\n",
        "vllm:num_requests_running{model_name=\"x\"} many\n",
        "vllm:num_requests_running{model_name=\"x} 1\n",
        "\u{0}\u{1}binary",
        "",
        "  \n",
    ] {
        let result = parse(PromFormat::Vllm, &BTreeMap::new(), text);
        assert!(
            matches!(result, Err(TelemetryError::Parse(_))),
            "{text:?} gave {result:?}"
        );
    }
}

#[test]
fn numbers_a_reading_cannot_hold_are_invalid() {
    for (format, text) in [
        (PromFormat::Vllm, "vllm:num_requests_running NaN\n"),
        (PromFormat::Vllm, "vllm:num_requests_waiting -3\n"),
        (PromFormat::Vllm, "vllm:gpu_cache_usage_perc +Inf\n"),
        (PromFormat::Vllm, "vllm:gpu_cache_usage_perc 1.5\n"),
        (PromFormat::Sglang, "sglang:token_usage -0.1\n"),
        (PromFormat::Dcgm, "DCGM_FI_DEV_GPU_UTIL{gpu=\"0\"} 140\n"),
        (PromFormat::Dcgm, "DCGM_FI_DEV_POWER_USAGE{gpu=\"0\"} -1\n"),
        (
            PromFormat::Dcgm,
            "DCGM_FI_DEV_FB_USED{gpu=\"0\"} 10\nDCGM_FI_DEV_FB_FREE{gpu=\"0\"} -20\n",
        ),
    ] {
        let result = parse(format, &BTreeMap::new(), text);
        assert!(
            matches!(result, Err(TelemetryError::Invalid(_))),
            "{format} {text:?} gave {result:?}"
        );
    }
}

#[test]
fn a_negative_series_cannot_cancel_another_in_a_sum() {
    let text = "vllm:num_requests_running{engine=\"0\"} 5\n\
                vllm:num_requests_running{engine=\"1\"} -5\n\
                vllm:num_requests_waiting{engine=\"0\"} 3\n";
    let err = parse(PromFormat::Vllm, &BTreeMap::new(), text).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, TelemetryError::Invalid(_))
            && msg.contains("vllm:num_requests_running")
            && msg.contains("engine=\"1\"")
            && msg.contains("-5"),
        "{msg}"
    );
    let text = "vllm:num_requests_running{engine=\"0\"} 5\n\
                vllm:num_requests_running{engine=\"1\"} NaN\n";
    let msg = parse(PromFormat::Vllm, &BTreeMap::new(), text)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("engine=\"1\"") && msg.contains("NaN"), "{msg}");
}

#[test]
fn parse_errors_are_short_even_for_huge_garbage() {
    let garbage = format!("vllm:num_requests_running 1\n{}", "x".repeat(1 << 20));
    let msg = parse(PromFormat::Vllm, &BTreeMap::new(), &garbage)
        .unwrap_err()
        .to_string();
    assert!(msg.len() < 1000, "{} bytes", msg.len());
}

#[test]
fn label_values_with_escapes_and_crlf_line_ends() {
    let text = "# TYPE vllm:num_requests_running gauge\r\n\
                vllm:num_requests_running{model_name=\"say \\\"hi\\\"\"} 3\r\n";
    let r = parse(
        PromFormat::Vllm,
        &filter(&[("model_name", "say \"hi\"")]),
        text,
    )
    .unwrap();
    assert_eq!(r.requests_running, Some(3.0));
}

#[test]
fn format_names_round_trip() {
    for f in [PromFormat::Vllm, PromFormat::Sglang, PromFormat::Dcgm] {
        assert_eq!(f.as_str().parse::<PromFormat>().unwrap(), f);
    }
    assert!("prometheus".parse::<PromFormat>().is_err());
}

/// Serves one connection per accept with `respond`, forever.
async fn serve<F, Fut>(respond: F) -> String
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(respond(stream));
        }
    });
    format!("http://{addr}/metrics")
}

/// Reads the request head so the client is not answered before it wrote.
async fn read_head(stream: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn read_scrapes_a_live_endpoint() {
    let url = serve(|mut s| async move {
        read_head(&mut s).await;
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            VLLM_V0.len()
        );
        let _ = s.write_all(head.as_bytes()).await;
        let _ = s.write_all(VLLM_V0.as_bytes()).await;
    })
    .await;
    let source = PrometheusSource::new(url, PromFormat::Vllm, BTreeMap::new());
    let r = source.read(Duration::from_secs(5)).await.unwrap();
    assert_eq!(r.requests_running, Some(7.0));
}

#[tokio::test]
async fn read_gives_up_on_a_slow_loris() {
    // Headers at once, then one byte of a valid body every 50 ms.
    let url = serve(|mut s| async move {
        read_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            .await;
        for byte in VLLM_V0.bytes().cycle() {
            if s.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let source = PrometheusSource::new(url, PromFormat::Vllm, BTreeMap::new());
    let timeout = Duration::from_millis(300);
    let started = tokio::time::Instant::now();
    // A hang guard only: the body never ends, so without its deadline the
    // read would not either; the error says the deadline ended it.
    let err = tokio::time::timeout(Duration::from_secs(30), source.read(timeout))
        .await
        .expect("the read never ended")
        .unwrap_err();
    assert_eq!(err, TelemetryError::Timeout(timeout));
    // A timeout cannot fire early; how late it fires is the scheduler's.
    assert!(started.elapsed() >= timeout);

    // And one that dribbles the status line itself.
    let url = serve(|mut s| async move {
        read_head(&mut s).await;
        for byte in b"HTTP/1.1 200 OK\r\n".iter().cycle() {
            if s.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let source = PrometheusSource::new(url, PromFormat::Vllm, BTreeMap::new());
    assert_eq!(
        source.read(timeout).await.unwrap_err(),
        TelemetryError::Timeout(timeout)
    );
}

#[tokio::test]
async fn read_refuses_a_huge_body() {
    const SIZE: usize = 10 << 20;
    for chunked in [false, true] {
        let url = serve(move |mut s| async move {
            read_head(&mut s).await;
            let line = b"vllm:num_requests_running 1\n";
            let body: Vec<u8> = line.iter().copied().cycle().take(SIZE).collect();
            if chunked {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    .await;
                for part in body.chunks(64 << 10) {
                    let head = format!("{:x}\r\n", part.len());
                    if s.write_all(head.as_bytes()).await.is_err()
                        || s.write_all(part).await.is_err()
                        || s.write_all(b"\r\n").await.is_err()
                    {
                        return;
                    }
                }
                let _ = s.write_all(b"0\r\n\r\n").await;
            } else {
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {SIZE}\r\n\r\n");
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&body).await;
            }
        })
        .await;
        let source = PrometheusSource::new(url.clone(), PromFormat::Vllm, BTreeMap::new());
        let err = source.read(Duration::from_secs(10)).await.unwrap_err();
        assert_eq!(
            err,
            TelemetryError::TooLarge {
                url,
                limit: MAX_BODY
            },
            "chunked: {chunked}"
        );
    }
}

#[tokio::test]
async fn read_reports_http_errors_and_refused_connections() {
    let url = serve(|mut s| async move {
        read_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            .await;
    })
    .await;
    let source = PrometheusSource::new(url.clone(), PromFormat::Vllm, BTreeMap::new());
    assert_eq!(
        source.read(Duration::from_secs(5)).await.unwrap_err(),
        TelemetryError::Status {
            status: 503,
            url,
            detail: None
        }
    );

    // A port nothing listens on (bound, then released).
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let source = PrometheusSource::new(
        format!("http://{addr}/metrics"),
        PromFormat::Vllm,
        BTreeMap::new(),
    );
    assert!(matches!(
        source.read(Duration::from_secs(5)).await.unwrap_err(),
        TelemetryError::Unreachable(_)
    ));
}
