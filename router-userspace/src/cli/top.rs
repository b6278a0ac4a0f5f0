//! `router top`: a live terminal view of services and backends, drawn with
//! ratatui from the control API's views. Keys drain and undrain the selected
//! backend. Rendering (`draw`) is pure, so it is tested on a `TestBackend`;
//! only `run` touches the terminal and the socket.

use std::{
    collections::{BTreeMap, VecDeque},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use ratatui::{
    Frame,
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::Line,
    widgets::{Block, Borders, Cell, Paragraph, Row, Table, TableState},
};

use crate::api::{
    client, path_segment,
    views::{BackendView, ServiceView},
};

/// Samples of GPU utilization kept per backend for the sparkline.
const HISTORY: usize = 24;
const SPARKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// What `router top` shows; fed by `update`, drawn by `draw`.
#[derive(Debug, Default)]
pub struct TopModel {
    pub services: Vec<ServiceView>,
    pub backends: Vec<BackendView>,
    gpu_history: BTreeMap<(String, String), VecDeque<f64>>,
    pub selected: usize,
    /// Result of the last key action, shown in the footer.
    pub message: String,
}

impl TopModel {
    pub fn update(&mut self, services: Vec<ServiceView>, backends: Vec<BackendView>) {
        for b in &backends {
            let h = self
                .gpu_history
                .entry((b.service.clone(), b.name.clone()))
                .or_default();
            h.push_back(b.gpu_util.or(b.load).unwrap_or(0.0));
            while h.len() > HISTORY {
                h.pop_front();
            }
        }
        self.gpu_history
            .retain(|(s, n), _| backends.iter().any(|b| &b.service == s && &b.name == n));
        self.services = services;
        self.backends = backends;
        self.selected = self.selected.min(self.backends.len().saturating_sub(1));
    }

    pub fn selected_backend(&self) -> Option<&BackendView> {
        self.backends.get(self.selected)
    }

    fn sparkline(&self, b: &BackendView) -> String {
        self.gpu_history
            .get(&(b.service.clone(), b.name.clone()))
            .map(|h| {
                h.iter()
                    .map(|v| SPARKS[((v.clamp(0.0, 1.0) * 7.0).round()) as usize])
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A fixed-width bar for a weight relative to the largest in view.
fn bar(value: u32, max: u32, width: usize) -> String {
    let filled = if max == 0 {
        0
    } else {
        (value as usize * width).div_ceil(max as usize).min(width)
    };
    format!("{}{}", "█".repeat(filled), "·".repeat(width - filled))
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
}

pub fn draw(frame: &mut Frame, m: &TopModel) {
    let [head, body, foot] = Layout::vertical([
        Constraint::Length(m.services.len() as u16 + 2),
        Constraint::Min(3),
        Constraint::Length(2),
    ])
    .areas(frame.area());

    let svc_lines: Vec<Line> = m
        .services
        .iter()
        .map(|s| {
            Line::from(format!(
                "{}  {}/{}  {}  backends {} (healthy {}, saturated {})  in flight {}  conn/s {}  fallback {}  ${}/h",
                s.name,
                s.vip,
                s.protocol,
                s.selection,
                s.backends,
                s.healthy_backends,
                s.saturated_backends,
                s.in_flight,
                s.new_conns_per_sec.map_or_else(|| "-".into(), |v| format!("{v:.1}")),
                s.fallback_connections,
                s.cost_per_hour.map_or_else(|| "-".into(), |v| format!("{v:.2}")),
            ))
        })
        .collect();
    frame.render_widget(
        Paragraph::new(svc_lines).block(
            Block::default()
                .borders(Borders::ALL)
                .title(" router top: services "),
        ),
        head,
    );

    let max_w = m.backends.iter().map(|b| b.weight).max().unwrap_or(0);
    let rows: Vec<Row> = m
        .backends
        .iter()
        .map(|b| {
            let health = match b.healthy {
                Some(true) => Cell::from("up").style(Style::default().fg(Color::Green)),
                Some(false) => Cell::from("DOWN").style(Style::default().fg(Color::Red)),
                None => Cell::from("-"),
            };
            let sat = if b.saturated {
                Cell::from("SAT").style(Style::default().fg(Color::Yellow))
            } else {
                Cell::from("")
            };
            Row::new(vec![
                Cell::from(format!("{}/{}", b.service, b.name)),
                Cell::from(format!("{:>4} {}", b.weight, bar(b.weight, max_w, 10))),
                Cell::from(m.sparkline(b)),
                sat,
                Cell::from(
                    b.new_conns_per_sec
                        .map_or_else(|| "-".into(), |v| format!("{v:.1}")),
                ),
                Cell::from(b.in_flight.to_string()),
                health,
                Cell::from(format!(
                    "{}/{}",
                    ms(b.first_byte_p50_ms),
                    ms(b.first_byte_p99_ms)
                )),
                Cell::from(format!("{}: {}", b.mode, b.reason)),
            ])
        })
        .collect();
    let table = Table::new(
        rows,
        [
            Constraint::Length(20),
            Constraint::Length(16),
            Constraint::Length(HISTORY as u16 + 1),
            Constraint::Length(4),
            Constraint::Length(7),
            Constraint::Length(7),
            Constraint::Length(5),
            Constraint::Length(14),
            Constraint::Min(10),
        ],
    )
    .header(
        Row::new(vec![
            "BACKEND",
            "WEIGHT",
            "GPU UTIL",
            "",
            "CONN/S",
            "IN FLT",
            "HLTH",
            "TTFB p50/p99 ms",
            "MODE: REASON",
        ])
        .style(Style::default().add_modifier(Modifier::BOLD)),
    )
    .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED))
    .highlight_symbol("> ")
    .block(Block::default().borders(Borders::ALL).title(" backends "));
    let mut state = TableState::default().with_selected(Some(m.selected));
    frame.render_stateful_widget(table, body, &mut state);

    frame.render_widget(
        Paragraph::new(vec![
            Line::from("↑/↓ select   d drain   u undrain   q quit"),
            Line::from(m.message.clone()),
        ]),
        foot,
    );
}

async fn fetch(socket: &Path) -> Result<(Vec<ServiceView>, Vec<BackendView>)> {
    let s = client::request(socket, "GET", "/v1/services").await?;
    let b = client::request(socket, "GET", "/v1/backends").await?;
    Ok((
        serde_json::from_slice(&s).context("decoding services")?,
        serde_json::from_slice(&b).context("decoding backends")?,
    ))
}

async fn act(socket: &Path, method: &str, b: &BackendView) -> String {
    let path = format!(
        "/v1/services/{}/backends/{}/drain",
        path_segment(&b.service),
        path_segment(&b.name)
    );
    let verb = if method == "POST" {
        "drained"
    } else {
        "undrained"
    };
    match client::request(socket, method, &path).await {
        Ok(_) => format!("{verb} {}/{}", b.service, b.name),
        Err(e) => format!("error: {e}"),
    }
}

/// The interactive view, until `q` or Esc.
pub async fn run(socket: &Path, refresh: Duration) -> Result<()> {
    let mut model = TopModel::default();
    let (s, b) = fetch(socket).await?;
    model.update(s, b);
    let mut terminal = ratatui::init();
    let result = async {
        let mut last = Instant::now();
        loop {
            terminal.draw(|f| draw(f, &model)).context("drawing")?;
            let wait = refresh.saturating_sub(last.elapsed());
            if event::poll(wait.min(Duration::from_millis(100))).context("reading keys")?
                && let Event::Key(k) = event::read().context("reading keys")?
                && k.kind == KeyEventKind::Press
            {
                // Raw mode turns Ctrl-C into a key, not SIGINT.
                if k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL) {
                    return Ok(());
                }
                match k.code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Up => model.selected = model.selected.saturating_sub(1),
                    KeyCode::Down => {
                        model.selected =
                            (model.selected + 1).min(model.backends.len().saturating_sub(1))
                    }
                    KeyCode::Char('d') | KeyCode::Char('u') => {
                        if let Some(b) = model.selected_backend().cloned() {
                            let method = if k.code == KeyCode::Char('d') {
                                "POST"
                            } else {
                                "DELETE"
                            };
                            model.message = act(socket, method, &b).await;
                            last = Instant::now() - refresh;
                        }
                    }
                    _ => {}
                }
            }
            if last.elapsed() >= refresh {
                match fetch(socket).await {
                    Ok((s, b)) => model.update(s, b),
                    Err(e) => model.message = format!("error: {e:#}"),
                }
                last = Instant::now();
            }
        }
    }
    .await;
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use ratatui::{Terminal, backend::TestBackend};

    use super::*;
    use crate::datapath::{Counters, Histogram};

    fn backend(name: &str, weight: u32, gpu: f64, saturated: bool) -> BackendView {
        BackendView {
            service: "llama".into(),
            name: name.into(),
            role: crate::datapath::BackendRole::Primary,
            address: "198.18.0.11:8000".into(),
            weight,
            share: 0.25,
            mode: crate::api::BackendMode::Auto,
            reason: if saturated {
                "saturated".into()
            } else {
                "headroom".into()
            },
            reason_label: if saturated {
                "saturated".into()
            } else {
                "headroom".into()
            },
            last_change: None,
            weight_changes: 0,
            load: Some(gpu),
            saturated,
            stale: false,
            healthy: Some(true),
            telemetry_source: None,
            telemetry_age_ms: Some(100),
            telemetry_errors: 0,
            gpu_util: Some(gpu),
            mem_used_bytes: None,
            mem_total_bytes: None,
            power_watts: None,
            throttle_reasons: None,
            kv_cache_usage: None,
            requests_running: None,
            requests_waiting: None,
            counters: Counters::default(),
            active_connections: Some(7),
            in_flight: 7,
            max_in_flight: 8,
            flows_closed: 40,
            in_flight_corrections: Default::default(),
            new_conns_per_sec: Some(12.5),
            connect_p50_ms: Some(0.2),
            connect_p99_ms: Some(0.9),
            first_byte_p50_ms: Some(41.0),
            first_byte_p99_ms: Some(230.0),
            connect_latency: Histogram::default(),
            first_byte_latency: Histogram::default(),
            cost_per_hour: Some(4.1),
            cost_per_1k_connections: None,
            drain_deadline_unix: None,
            flows_ended: None,
        }
    }

    fn service() -> ServiceView {
        ServiceView {
            name: "llama".into(),
            vip: "198.18.100.1:8000".into(),
            protocol: "tcp".into(),
            backends: 2,
            healthy_backends: 2,
            saturated_backends: 1,
            counters: Counters::default(),
            selection: "least_loaded".into(),
            in_flight: 14,
            active_connections: Some(14),
            new_conns_per_sec: Some(25.0),
            cost_per_hour: Some(8.2),
            cost_per_1k_connections: Some(0.09),
            fallback_connections: 3,
        }
    }

    fn screen(m: &TopModel) -> String {
        let mut t = Terminal::new(TestBackend::new(150, 14)).unwrap();
        t.draw(|f| draw(f, m)).unwrap();
        let buf = t.backend().buffer().clone();
        (0..buf.area.height)
            .map(|y| {
                (0..buf.area.width)
                    .map(|x| buf[(x, y)].symbol().to_string())
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn shows_weights_sparklines_latency_and_reasons() {
        let mut m = TopModel::default();
        for gpu in [0.1, 0.5, 1.0] {
            m.update(
                vec![service()],
                vec![
                    backend("gpu-0", 100, 0.3, false),
                    backend("gpu-1", 40, gpu, true),
                ],
            );
        }
        let s = screen(&m);
        assert!(
            s.contains(
                "llama  198.18.100.1:8000/tcp  least_loaded  backends 2 (healthy 2, saturated 1)  in flight 14"
            ),
            "{s}"
        );
        assert!(s.contains("fallback 3"), "{s}");
        assert!(
            s.contains("> llama/gpu-0"),
            "selection marker on the first row:\n{s}"
        );
        assert!(
            s.contains(" 100 ██████████"),
            "full bar for the heaviest:\n{s}"
        );
        assert!(s.contains("  40 ████······"), "40% bar:\n{s}");
        // gpu-1's history 0.1, 0.5, 1.0 → ▂ ▅ █ (rounded to eighths).
        assert!(s.contains("▂▅█"), "sparkline:\n{s}");
        assert!(s.contains("SAT"), "{s}");
        assert!(s.contains("41.0/230.0"), "TTFB p50/p99:\n{s}");
        assert!(s.contains("auto: saturated"), "{s}");
        assert!(s.contains("d drain"), "{s}");
    }

    #[test]
    fn selection_follows_the_backend_list() {
        let mut m = TopModel::default();
        m.update(
            vec![service()],
            vec![
                backend("gpu-0", 1, 0.0, false),
                backend("gpu-1", 1, 0.0, false),
            ],
        );
        m.selected = 1;
        assert_eq!(m.selected_backend().unwrap().name, "gpu-1");
        let s = screen(&m);
        assert!(s.contains("> llama/gpu-1"), "{s}");
        // A backend leaves: the selection stays in range, its history goes.
        m.update(vec![service()], vec![backend("gpu-0", 1, 0.0, false)]);
        assert_eq!(m.selected, 0);
        assert_eq!(m.gpu_history.len(), 1);
    }

    #[test]
    fn bars_scale_to_the_largest_weight() {
        assert_eq!(bar(0, 100, 4), "····");
        assert_eq!(bar(100, 100, 4), "████");
        assert_eq!(bar(1, 100, 4), "█···");
        assert_eq!(bar(5, 0, 4), "····");
    }
}
