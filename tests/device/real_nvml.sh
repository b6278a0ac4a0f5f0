#!/usr/bin/env bash
# The real-NVML check, for a machine with an NVIDIA GPU (CI has none; the
# fake libnvidia-ml stands in there). It runs `router agent` against the
# system's libnvidia-ml through nvml-wrapper, the code path the daemon's
# `nvml` telemetry source uses, reads GPU 0 idle, under a bounded bf16
# matrix-product load (PyTorch) with a 32 GiB allocation, and after it, and
# compares each phase with nvidia-smi. It also checks the agent's answers
# to bad requests. Usage: tests/device/real_nvml.sh [ROUTER_BINARY] [OUTDIR]
set -euo pipefail
BIN=${1:-target/release/router}
DIR=${2:-${OUT:-/tmp/real_nvml}}
mkdir -p "$DIR"
TOKEN_FILE=$(mktemp)
echo "device-check-token" >"$TOKEN_FILE"
SMI_FIELDS=index,uuid,name,driver_version,utilization.gpu,utilization.memory,memory.used,memory.total,power.draw,temperature.gpu,clocks_event_reasons.active
nvidia-smi --query-gpu=$SMI_FIELDS --format=csv >"$DIR/smi_idle.csv"
"$BIN" agent --listen 127.0.0.1:9400 --token-file "$TOKEN_FILE" >"$DIR/agent.log" 2>&1 &
AGENT=$!
trap 'kill $AGENT 2>/dev/null || true; rm -f "$TOKEN_FILE"' EXIT
export SMI_FIELDS TOKEN_FILE DIR
python3 - <<'PY'
import json, os, statistics, subprocess, sys, time, urllib.error, urllib.request

DIR = os.environ["DIR"]
TOKEN = open(os.environ["TOKEN_FILE"]).read().strip()
BASE = "http://127.0.0.1:9400"

def get(path, token=TOKEN):
    req = urllib.request.Request(BASE + path)
    if token is not None:
        req.add_header("Authorization", "Bearer " + token)
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    return status, json.loads(body), (time.perf_counter() - t0) * 1e3

def smi():
    out = subprocess.check_output(["nvidia-smi", "--query-gpu=" + os.environ["SMI_FIELDS"],
                                   "--format=csv,noheader,nounits"], text=True)
    return [f.strip() for f in out.splitlines()[0].split(",")]

for _ in range(100):  # hang guard: the agent loads NVML, then binds
    try:
        get("/v1/gpus/0"); break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit("the agent never answered")

failures = []
def expect(what, cond):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)

status, idle, _ = get("/v1/gpus/0")
expect(f"GET /v1/gpus/0 is 200 ({status})", status == 200)
uuid = smi()[1]
status, by_uuid, _ = get("/v1/gpus/uuid/" + uuid)
expect(f"GET by UUID {uuid} is 200 ({status})", status == 200)
expect("the UUID's reading has the same memory total", by_uuid.get("mem_total_bytes") == idle.get("mem_total_bytes"))
count = int(subprocess.check_output(["nvidia-smi", "-L"], text=True).count("GPU "))
status, body, _ = get(f"/v1/gpus/{count}")
expect(f"GPU {count} (absent) is 404: {body}", status == 404)
status, body, _ = get("/v1/gpus/abc")
expect(f"index 'abc' is 400: {body}", status == 400)
status, body, _ = get("/v1/gpus/0", token=None)
expect(f"no token is 401: {body}", status == 401)
status, body, _ = get("/v1/gpus/0", token="wrong")
expect(f"a wrong token is 401: {body}", status == 401)

samples = []
def sample(phase):
    status, r, ms = get("/v1/gpus/0")
    samples.append({"phase": phase, "t": time.time(), "status": status, "ms": ms, "agent": r, "smi": smi()})

for _ in range(3):
    sample("idle"); time.sleep(0.5)
load = subprocess.Popen([sys.executable, "-c", """
import time, torch
hold = torch.empty(32 << 30, dtype=torch.uint8, device='cuda')
a = torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16)
end = time.time() + 15
n = 0
while time.time() < end:
    for _ in range(20):
        c = a @ b
    torch.cuda.synchronize(); n += 20
print(f'load: {n} products of 8192^3 bf16 in 15 s')
"""])
time.sleep(4)  # CUDA start and the allocation
while load.poll() is None:
    sample("load"); time.sleep(1)
for _ in range(4):
    time.sleep(1); sample("after")

with open(os.path.join(DIR, "readings.json"), "w") as f:
    json.dump({"idle_reading": idle, "samples": samples}, f, indent=1)

fields = os.environ["SMI_FIELDS"].split(",")
print(f"\nGPU 0: {smi()[2]}, driver {smi()[3]}, uuid {uuid}")
print("phase  agent: gpu_util mem_util mem_used_GiB power_W temp_C throttle | nvidia-smi: util% memutil% used_MiB power_W temp_C reasons | read ms")
def f(v, spec, scale=1):
    return "-" if v is None else format(v / scale if scale != 1 else v, spec)
for s in samples:
    a, m = s["agent"], dict(zip(fields, s["smi"]))
    print(f"{s['phase']:6} {f(a.get('gpu_util'), '.2f')} {f(a.get('mem_util'), '.2f')} "
          f"{f(a.get('mem_used_bytes'), '.2f', 2**30)} {f(a.get('power_watts'), '.1f')} "
          f"{f(a.get('temperature_c'), '.0f')} {f(a.get('throttle_reasons'), '#x')} | "
          f"{m['utilization.gpu']} {m['utilization.memory']} {m['memory.used']} {m['power.draw']} "
          f"{m['temperature.gpu']} {m['clocks_event_reasons.active']} | {s['ms']:.1f}")
ms = sorted(s["ms"] for s in samples)
print(f"agent read latency: median {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms over {len(ms)} reads")
peak = max(s["agent"].get("gpu_util") or 0 for s in samples if s["phase"] == "load")
expect(f"the agent saw the load (peak gpu_util {peak:.2f} > 0.5)", peak > 0.5)
used = max(s["agent"].get("mem_used_bytes") or 0 for s in samples if s["phase"] == "load")
expect(f"the agent saw the 32 GiB allocation ({used/2**30:.1f} GiB used)", used > 32 * 2**30)
expect("mem_total matches nvidia-smi (MiB)", abs((idle.get("mem_total_bytes") or 0) / 2**20 - float(dict(zip(fields, samples[0]["smi"]))["memory.total"])) < 2)
sys.exit(1 if failures else 0)
PY
