//! The `spooky` command: run the load balancer, check a config, talk
//! HTTP/3 (`get`), or run a demo backend.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::{HeaderName, HeaderValue, Method, Request};
use http_body_util::BodyExt;
use spooky::client::{ClientOptions, H3Client};
use spooky::{body, config, demo, server};

#[derive(Parser)]
#[command(
    name = "spooky",
    version,
    about = "HTTP/3 load balancer with eBPF connection-ID steering"
)]
struct Cli {
    /// Config file (same as `spooky run -c FILE`).
    #[arg(short, long, global = false)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the load balancer.
    Run {
        #[arg(short, long, default_value = "config/spooky.yaml")]
        config: PathBuf,
    },
    /// Ask a running spooky to reload its config (`POST /reload` on the
    /// admin listener named in the config; SIGHUP does the same).
    Reload {
        #[arg(short, long, default_value = "config/spooky.yaml")]
        config: PathBuf,
    },
    /// Replace the running spooky with a new binary without dropping a
    /// connection: the new process takes the sockets, the old one drains.
    /// Exits non-zero, with the reason, when the new process fails (the old
    /// one then keeps serving).
    Upgrade {
        #[arg(short, long, default_value = "config/spooky.yaml")]
        config: PathBuf,
        /// The new binary (default: the file the running spooky was
        /// started from, e.g. after a package upgrade replaced it).
        #[arg(long)]
        binary: Option<PathBuf>,
        /// How long the new process may take to become ready, e.g. 30s.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Validate a config file; exits non-zero and lists every problem.
    Check {
        #[arg(short, long, default_value = "config/spooky.yaml")]
        config: PathBuf,
    },
    /// Send HTTP/3 requests and print the responses.
    Get(GetArgs),
    /// Run a demo HTTP/3 backend that answers with its id.
    DemoBackend {
        /// Name in responses (`hello from ID`) and the `x-backend-id` header.
        #[arg(long)]
        id: String,
        /// UDP address to listen on.
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: std::net::SocketAddr,
        /// Certificate (PEM/DER); default: a generated self-signed one.
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// Private key for --cert.
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        /// Delay every response by this many milliseconds.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Protocol to serve (HTTP/1.1 and HTTP/2 listen on TCP).
        #[arg(long, value_enum, default_value = "http3")]
        protocol: demo::DemoProtocol,
        /// HTTP/1.1, HTTP/2: serve TLS (default: cleartext, h2c for HTTP/2).
        #[arg(long)]
        tls: bool,
        /// Require client certificates issued by this CA (mTLS).
        #[arg(long)]
        client_ca: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct GetArgs {
    /// https://HOST[:PORT]/PATH
    url: String,
    /// Number of requests (all on one connection).
    #[arg(short = 'n', long, default_value_t = 1)]
    requests: usize,
    /// Requests in flight at once.
    #[arg(short = 'c', long, default_value_t = 1)]
    concurrency: usize,
    /// Accept any server certificate.
    #[arg(short = 'k', long)]
    insecure: bool,
    /// Trust this CA certificate (PEM/DER).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Method.
    #[arg(short = 'X', long, default_value = "GET")]
    method: String,
    /// Extra header, `name: value` (repeatable).
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// Request body; `@FILE` reads a file.
    #[arg(short = 'd', long)]
    data: Option<String>,
    /// Print only the status line of each response (and the summary).
    #[arg(short = 's', long)]
    status_only: bool,
    /// Print response headers too.
    #[arg(short = 'i', long)]
    include: bool,
}

fn init_logging(level: &str) {
    init_logging_as(level, config::LogFormat::Text);
}

fn init_logging_as(level: &str, format: config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        config::LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match (cli.command, cli.config) {
        (Some(Command::Run { config }), _) | (None, Some(config)) => run(config),
        (None, None) => run(PathBuf::from("config/spooky.yaml")),
        (Some(Command::Check { config }), _) => check(config),
        (Some(Command::Reload { config }), _) => reload(config),
        (
            Some(Command::Upgrade {
                config,
                binary,
                timeout,
            }),
            _,
        ) => upgrade(config, binary, timeout),
        (Some(Command::Get(args)), _) => get(args),
        (
            Some(Command::DemoBackend {
                id,
                listen,
                cert,
                key,
                delay_ms,
                protocol,
                tls,
                client_ca,
            }),
            _,
        ) => demo_backend(demo::DemoOptions {
            id,
            listen,
            protocol,
            cert: cert.zip(key),
            tls,
            client_ca,
            delay: Duration::from_millis(delay_ms),
        }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("spooky: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: PathBuf) -> Result<ExitCode> {
    let cfg = match config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(2));
        }
    };
    init_logging_as(&cfg.log.level, cfg.log.format);
    server::run(cfg, &path)?;
    Ok(ExitCode::SUCCESS)
}

/// `spooky reload`: POST /reload to the admin listener the config names.
fn reload(path: PathBuf) -> Result<ExitCode> {
    let cfg = match config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}\nnot reloading: fix the file first");
            return Ok(ExitCode::from(2));
        }
    };
    let Some(admin) = cfg.admin else {
        bail!(
            "{} has no `admin` listener to send the reload to; send SIGHUP to the spooky process instead (`systemctl reload spooky`)",
            path.display()
        );
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (status, body) = rt.block_on(admin_post(admin.addr, "/reload", admin.token.as_deref()))?;
    print!("{body}");
    Ok(if status.is_success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn admin_post(
    addr: std::net::SocketAddr,
    path: &str,
    token: Option<&str>,
) -> Result<(http::StatusCode, String)> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| {
            format!("cannot reach the admin listener at {addr}: is spooky running?")
        })?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = Request::post(path).header("host", addr.to_string());
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = send
        .send_request(req.body(http_body_util::Empty::<Bytes>::new())?)
        .await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// `spooky upgrade`: asks the running spooky (through the control socket
/// in its state directory) to start the new binary and hand over.
fn upgrade(path: PathBuf, binary: Option<PathBuf>, timeout: Duration) -> Result<ExitCode> {
    let cfg = match config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}\nnot upgrading: the new process would read this file and fail");
            return Ok(ExitCode::from(2));
        }
    };
    let binary = match binary {
        Some(b) => {
            Some(std::fs::canonicalize(&b).with_context(|| format!("--binary {}", b.display()))?)
        }
        None => None,
    };
    let reply = spooky::upgrade::control::request(
        &cfg.state_dir,
        &spooky::upgrade::control::UpgradeRequest {
            binary,
            timeout_ms: timeout.as_millis() as u64,
        },
    )?;
    println!("{}", reply.message);
    Ok(if reply.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `500ms`, `30s`, `2m`, or plain milliseconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (number, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => t.split_at(at),
        None => (t, "ms"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 500ms, 30s or 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("`{text}` is not a duration like 500ms, 30s or 2m")),
    }
}

fn check(path: PathBuf) -> Result<ExitCode> {
    match config::load(&path) {
        Ok(cfg) => {
            println!(
                "{}: ok ({} upstream{}, {} route{}, {} worker{})",
                path.display(),
                cfg.upstreams.len(),
                if cfg.upstreams.len() == 1 { "" } else { "s" },
                cfg.routes.len(),
                if cfg.routes.len() == 1 { "" } else { "s" },
                cfg.listen.workers,
                if cfg.listen.workers == 1 { "" } else { "s" },
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{e}");
            Ok(ExitCode::from(2))
        }
    }
}

fn demo_backend(opts: demo::DemoOptions) -> Result<ExitCode> {
    init_logging("info");
    // Current-thread, like spooky's workers: on an oversubscribed machine a
    // multi-threaded runtime driving quinn stalled for tens of seconds
    // (tasks parked while the I/O driver ran on the other thread).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(demo::serve(opts))?;
    Ok(ExitCode::SUCCESS)
}

fn get(args: GetArgs) -> Result<ExitCode> {
    init_logging("warn");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(get_async(args))
}

async fn get_async(args: GetArgs) -> Result<ExitCode> {
    let opts = ClientOptions {
        insecure: args.insecure,
        ca: args.ca.clone(),
        ..Default::default()
    };
    let method = Method::from_bytes(args.method.as_bytes()).context("invalid method")?;
    let mut headers = Vec::new();
    for h in &args.headers {
        let Some((n, v)) = h.split_once(':') else {
            bail!("header `{h}` is not `name: value`");
        };
        headers.push((
            HeaderName::from_bytes(n.trim().to_ascii_lowercase().as_bytes())?,
            HeaderValue::from_str(v.trim())?,
        ));
    }
    let data: Option<Bytes> = match &args.data {
        None => None,
        Some(d) => Some(match d.strip_prefix('@') {
            Some(file) => std::fs::read(file)
                .with_context(|| format!("reading {file}"))?
                .into(),
            None => Bytes::from(d.clone().into_bytes()),
        }),
    };
    let started = Instant::now();
    let client = H3Client::connect(&args.url, &opts).await?;
    let (_, _, uri) = spooky::client::parse_url(&args.url)?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();

    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let client = std::sync::Arc::new(client);
    let mut tasks = Vec::new();
    for i in 0..args.requests {
        let permit = sem.clone().acquire_owned().await?;
        let (client, method, path, headers, data) = (
            client.clone(),
            method.clone(),
            path.clone(),
            headers.clone(),
            data.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let mut req = Request::builder().method(method).uri(path.as_str());
            for (n, v) in headers {
                req = req.header(n, v);
            }
            let body = data.map_or_else(body::empty, body::full);
            let resp = client.send(req.body(body)?).await?;
            let (parts, body) = resp.into_parts();
            let collected = body.collect().await.map_err(|e| anyhow::anyhow!(e))?;
            let trailers = collected.trailers().cloned();
            Ok::<_, anyhow::Error>((i, parts, collected.to_bytes(), trailers))
        }));
    }
    let mut ok = 0usize;
    let mut failed = 0usize;
    let mut out = std::io::stdout().lock();
    for t in tasks {
        match t.await? {
            Ok((i, parts, bytes, trailers)) => {
                ok += 1;
                if args.requests > 1 {
                    write!(out, "[{i}] ")?;
                }
                writeln!(out, "{:?} {}", parts.version, parts.status)?;
                if args.include {
                    for (k, v) in &parts.headers {
                        writeln!(out, "{k}: {}", v.to_str().unwrap_or("<binary>"))?;
                    }
                }
                if !args.status_only {
                    out.write_all(&bytes)?;
                    if !bytes.ends_with(b"\n") && !bytes.is_empty() {
                        writeln!(out)?;
                    }
                }
                if args.include
                    && let Some(t) = trailers
                {
                    for (k, v) in &t {
                        writeln!(out, "trailer {k}: {}", v.to_str().unwrap_or("<binary>"))?;
                    }
                }
            }
            Err(e) => {
                failed += 1;
                writeln!(out, "error: {e:#}")?;
            }
        }
    }
    if args.requests > 1 {
        let secs = started.elapsed().as_secs_f64();
        writeln!(
            out,
            "{ok} ok, {failed} failed in {secs:.3} s ({:.0} req/s)",
            ok as f64 / secs
        )?;
    }
    drop(out);
    if let Ok(c) = std::sync::Arc::try_unwrap(client) {
        c.close().await;
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
