//! `router agent` and the daemon's agent source end to end, over TCP on
//! localhost, with the fake NVML library behind the agent; and the agent
//! source against endpoints that serve garbage or stall.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use router::{
    agent::{self, AgentOptions},
    telemetry::{DeviceSelector, Reading, TelemetryError, agent_source::AgentSource},
};
use router_testkit::fake_nvml::{FakeError, FakeGpu, FakeGpuState, FakeNvml};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
};

const TOKEN: &str = "correct-horse-battery-staple";
const POLL: Duration = Duration::from_secs(2);

/// A running agent; dropping it stops the server.
struct RunningAgent {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

impl RunningAgent {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn source(&self, device: DeviceSelector, token: &str) -> AgentSource {
        AgentSource::new(&self.url(), device, token).unwrap()
    }
}

async fn start_agent(fake: &FakeNvml) -> RunningAgent {
    let bound = agent::bind(AgentOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        token: TOKEN.into(),
        library: Some(fake.library().to_path_buf()),
        tls: None,
    })
    .await
    .unwrap();
    let addr = bound.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(bound.serve(async move {
        let _ = stopped.await;
    }));
    RunningAgent { addr, _stop: stop }
}

/// One raw request; returns (status, headers, body) of the answer.
async fn raw_get(addr: SocketAddr, path: &str, auth: Option<&str>) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n");
    if let Some(a) = auth {
        req.push_str(&format!("Authorization: {a}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(POLL, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_string())
}

fn error_message(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["error"].as_str().unwrap().to_string()
}

fn two_gpus() -> FakeGpuState {
    let mut second = FakeGpu::new(1);
    second.sm_util = 90;
    second.power_mw = 700_000;
    FakeGpuState {
        init_error: None,
        devices: vec![FakeGpu::new(0), second],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_the_right_token_are_refused() {
    let fake = FakeNvml::acquire(&two_gpus()).unwrap();
    let agent = start_agent(&fake).await;
    for auth in [
        None,
        Some("Bearer wrong".to_string()),
        Some(format!("Bearer {TOKEN}x")),
        Some(format!("Basic {TOKEN}")),
        Some("Bearer ".to_string()),
    ] {
        for path in ["/v1/gpus/0", "/v1/gpus/uuid/GPU-x", "/elsewhere"] {
            let (status, head, body) = raw_get(agent.addr, path, auth.as_deref()).await;
            assert_eq!(status, 401, "{auth:?} {path}");
            assert!(head.contains("www-authenticate: bearer"), "{head}");
            assert_eq!(error_message(&body), "missing or wrong bearer token");
        }
    }
    let (status, _, _) = raw_get(agent.addr, "/v1/gpus/0", Some(&format!("bearer {TOKEN}"))).await;
    assert_eq!(status, 200, "the scheme is case-insensitive");

    let err = agent
        .source(DeviceSelector::Index(0), "wrong")
        .read(POLL)
        .await
        .unwrap_err();
    assert!(
        matches!(err, TelemetryError::Status { status: 401, .. }),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_source_reads_the_fake_gpu() {
    let fake = FakeNvml::acquire(&two_gpus()).unwrap();
    let agent = start_agent(&fake).await;
    let want = Reading {
        gpu_util: Some(0.9),
        mem_util: Some(0.2),
        mem_used_bytes: Some(1e9),
        mem_total_bytes: Some(8e10),
        power_watts: Some(700.0),
        temperature_c: Some(61.0),
        throttle_reasons: Some(0),
        ..Reading::default()
    };
    let by_index = agent.source(DeviceSelector::Index(1), TOKEN);
    assert_eq!(by_index.read(POLL).await.unwrap(), want);
    let by_uuid = agent.source(DeviceSelector::Uuid(FakeGpu::new(1).uuid), TOKEN);
    assert_eq!(by_uuid.read(POLL).await.unwrap(), want);

    // The agent reads NVML per request: a change shows on the next poll.
    let mut state = two_gpus();
    state.devices[1].sm_util = 10;
    fake.set(&state).unwrap();
    assert_eq!(by_index.read(POLL).await.unwrap().gpu_util, Some(0.1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nvml_errors_are_503_with_the_message() {
    let fake = FakeNvml::acquire(&two_gpus()).unwrap();
    let agent = start_agent(&fake).await;
    let auth = format!("Bearer {TOKEN}");
    for (error, words) in [
        (FakeError::GpuIsLost, "GPU is lost"),
        (FakeError::Timeout, "timed out"),
        (FakeError::Unknown, "unknown error"),
    ] {
        let mut state = two_gpus();
        state.devices[0].error = Some(error);
        fake.set(&state).unwrap();
        let (status, _, body) = raw_get(agent.addr, "/v1/gpus/0", Some(&auth)).await;
        assert_eq!(status, 503, "{error:?}");
        let msg = error_message(&body);
        assert!(
            msg.starts_with("NVML: GPU 0") && msg.contains(words),
            "{msg}"
        );
        let err = agent
            .source(DeviceSelector::Index(0), TOKEN)
            .read(POLL)
            .await
            .unwrap_err();
        assert!(
            matches!(err, TelemetryError::Status { status: 503, .. }),
            "{err:?}"
        );
        // The daemon's error (its status and logs) carries the agent's word.
        assert!(err.to_string().contains(words), "{err}");
        // The healthy GPU next to it is unaffected.
        let (status, _, _) = raw_get(agent.addr, "/v1/gpus/1", Some(&auth)).await;
        assert_eq!(status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_gpus_and_bad_paths() {
    let fake = FakeNvml::acquire(&two_gpus()).unwrap();
    let agent = start_agent(&fake).await;
    let auth = format!("Bearer {TOKEN}");
    let (status, _, body) = raw_get(agent.addr, "/v1/gpus/7", Some(&auth)).await;
    assert_eq!(status, 404);
    assert_eq!(
        error_message(&body),
        "NVML: GPU 7: no such GPU (2 GPUs present)"
    );
    let (status, _, _) = raw_get(agent.addr, "/v1/gpus/uuid/GPU-nope", Some(&auth)).await;
    assert_eq!(status, 404);
    let (status, _, body) = raw_get(agent.addr, "/v1/gpus/zero", Some(&auth)).await;
    assert_eq!(status, 400);
    assert!(error_message(&body).contains("not a number"));
    let (status, _, _) = raw_get(agent.addr, "/v1/gpus/uuid/GPU%00x", Some(&auth)).await;
    assert_eq!(status, 400, "a NUL must not reach NVML");
    let (status, _, _) = raw_get(agent.addr, "/v2/anything", Some(&auth)).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_to_start_without_a_token_or_library() {
    let fake = FakeNvml::acquire(&two_gpus()).unwrap();
    let err = agent::bind(AgentOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        token: "  ".into(),
        library: Some(fake.library().to_path_buf()),
        tls: None,
    })
    .await
    .err()
    .unwrap();
    assert!(format!("{err:#}").contains("token is empty"), "{err:#}");
    let err = agent::bind(AgentOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        token: TOKEN.into(),
        library: Some("/nonexistent/libnvidia-ml.so.1".into()),
        tls: None,
    })
    .await
    .err()
    .unwrap();
    assert!(
        format!("{err:#}").contains("cannot load NVML library /nonexistent/libnvidia-ml.so.1"),
        "{err:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_drops_a_client_that_never_finishes_its_request() {
    let fake = FakeNvml::acquire(&two_gpus()).unwrap();
    let agent = start_agent(&fake).await;
    let mut s = TcpStream::connect(agent.addr).await.unwrap();
    s.write_all(b"GET /v1/gpus/0 HTTP/1.1\r\nHost: agent\r\n")
        .await
        .unwrap();
    // The header read timeout is 5 s; the connection must be closed (EOF or
    // a 408) well before this generous bound.
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "a slow-loris client held the connection");
    let text = String::from_utf8_lossy(&buf);
    assert!(!text.contains("200 OK"), "{text}");
}

/// How a misbehaving endpoint answers each connection.
#[derive(Clone)]
enum Misbehave {
    /// Writes these bytes and closes.
    Answer(Vec<u8>),
    /// Reads the request and never answers.
    Silent,
    /// Sends a valid head, then the body one byte per 100 ms.
    Trickle(Vec<u8>),
}

async fn misbehaving_endpoint(how: Misbehave) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let how = how.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                match how {
                    Misbehave::Answer(bytes) => {
                        let _ = s.write_all(&bytes).await;
                        let _ = s.shutdown().await;
                    }
                    Misbehave::Silent => {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                    Misbehave::Trickle(body) => {
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                            body.len()
                        );
                        let _ = s.write_all(head.as_bytes()).await;
                        for b in body {
                            if s.write_all(&[b]).await.is_err() {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

fn ok_response(body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// Bounds a read that never returns at all, so the test fails instead of
/// hanging. Not a speed limit: every deadline under test is a fraction of
/// it, and it is under the silent endpoint's 60 s, so a read that only
/// ends when the peer gives up fails too.
const HANG_GUARD: Duration = Duration::from_secs(30);

/// One read from an endpoint behaving `how`, and how long it took.
async fn read_from(
    how: Misbehave,
    timeout: Duration,
) -> (Result<Reading, TelemetryError>, Duration) {
    let url = misbehaving_endpoint(how).await;
    let src = AgentSource::new(&url, DeviceSelector::Index(0), TOKEN).unwrap();
    let start = Instant::now();
    let r = tokio::time::timeout(HANG_GUARD, src.read(timeout))
        .await
        .unwrap_or_else(|_| panic!("the read did not return within {HANG_GUARD:?}"));
    (r, start.elapsed())
}

/// Whether an error is the one a case expects.
type Expect = fn(&TelemetryError) -> bool;

#[tokio::test]
async fn garbage_from_an_endpoint_is_an_error() {
    let t = Duration::from_secs(2);
    let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        ("not JSON", ok_response(b"<html>hello</html>"), |e| {
            matches!(e, TelemetryError::Parse(_))
        }),
        ("NaN", ok_response(br#"{"gpu_util": NaN}"#), |e| {
            matches!(e, TelemetryError::Parse(_))
        }),
        (
            "a string for a number",
            ok_response(br#"{"gpu_util": "0.5"}"#),
            |e| matches!(e, TelemetryError::Parse(_)),
        ),
        (
            "negative",
            ok_response(br#"{"gpu_util": 0.5, "power_watts": -3}"#),
            |e| matches!(e, TelemetryError::Invalid(_)),
        ),
        ("above 100%", ok_response(br#"{"gpu_util": 1.5}"#), |e| {
            matches!(e, TelemetryError::Invalid(_))
        }),
        ("no metric", ok_response(b"{}"), |e| {
            matches!(e, TelemetryError::Invalid(_))
        }),
        ("huge body", ok_response(&vec![b' '; 1 << 20]), |e| {
            matches!(e, TelemetryError::TooLarge { limit: 65536, .. })
        }),
        (
            "server error",
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n".to_vec(),
            |e| matches!(e, TelemetryError::Status { status: 500, .. }),
        ),
        ("not HTTP", b"SSH-2.0-OpenSSH_9.6\r\n".to_vec(), |e| {
            matches!(e, TelemetryError::Unreachable(_))
        }),
    ];
    // Each is its own error, not a timeout: the read gave up on what it
    // got, rather than waiting out its deadline.
    for (what, response, expected) in cases {
        let (r, _) = read_from(Misbehave::Answer(response), t).await;
        match r {
            Err(e) if expected(&e) => {}
            other => panic!("{what}: unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn stalling_endpoints_time_out_at_their_deadline() {
    let t = Duration::from_millis(500);
    for (what, how) in [
        ("never answers", Misbehave::Silent),
        (
            "slow loris",
            Misbehave::Trickle(br#"{"gpu_util": 0.5, "mem_util": 0.25}"#.to_vec()),
        ),
    ] {
        let (r, took) = read_from(how, t).await;
        // Its own deadline ended it (the error names it), not the peer.
        assert_eq!(r, Err(TelemetryError::Timeout(t)), "{what}");
        // A deadline cannot fire early: the one bound that holds however
        // busy the machine. How late it fired is the scheduler's, so it
        // is not asserted (`read_from` only guards against a hang).
        assert!(took >= t, "{what}: timed out after {took:?}, before {t:?}");
    }
}

/// The TLS fixtures of router-userspace (a CA, a leaf for 127.0.0.1 signed
/// by it, an unrelated CA).
fn tls_fixture(name: &str) -> std::path::PathBuf {
    router_testkit::fixtures::workspace_root()
        .join("router-userspace/tests/fixtures/tls")
        .join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_serving_tls_is_read_through_its_ca_and_only_that() {
    let fake = FakeNvml::acquire(&two_gpus()).unwrap();
    let tls =
        router::tls::server_config(&tls_fixture("agent.pem"), &tls_fixture("agent.key")).unwrap();
    let bound = agent::bind(AgentOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        token: TOKEN.into(),
        library: Some(fake.library().to_path_buf()),
        tls: Some(tls),
    })
    .await
    .unwrap();
    let addr = bound.local_addr();
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(bound.serve(async move {
        let _ = stopped.await;
    }));
    let url = format!("https://{addr}");
    let trusted = router::tls::client_config(&tls_fixture("ca.pem")).unwrap();
    let reading = AgentSource::new(&url, DeviceSelector::Index(1), TOKEN)
        .unwrap()
        .with_tls(trusted)
        .read(POLL)
        .await
        .unwrap();
    assert_eq!(reading.gpu_util, Some(0.9));

    let stranger = router::tls::client_config(&tls_fixture("other-ca.pem")).unwrap();
    let err = AgentSource::new(&url, DeviceSelector::Index(1), TOKEN)
        .unwrap()
        .with_tls(stranger)
        .read(POLL)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
    // The token never goes out in clear to a TLS agent: plain HTTP gets no
    // reading.
    let plain = AgentSource::new(&format!("http://{addr}"), DeviceSelector::Index(1), TOKEN)
        .unwrap()
        .read(POLL)
        .await;
    assert!(plain.is_err(), "{plain:?}");
}
