//! `strait-echo`: the servers and clients end-to-end tests run inside pods (see
//! `strait_testbed::echo`). Exit status 0 means success, 1 a failed check, 2 a usage error;
//! `get`, `ws` and `grpc-call` print one JSON object on stdout either way.

use std::process::ExitCode;
use std::time::Duration;

use strait_testbed::echo::abuse::{self, AbuseOptions};
use strait_testbed::echo::client::{self, GetOptions, HttpUrl};
use strait_testbed::echo::rapid_reset::{self, RapidResetOptions};
use strait_testbed::echo::tls;
use strait_testbed::echo::{ServerConfig, dns, flood, grpc, http, tcp, websocket};

const USAGE: &str = "usage:
  strait-echo http PORT [--name NAME] [--delay-ms N] [--http-version 1.0|1.1]
  strait-echo grpc PORT [--name NAME] [--delay-ms N]
  strait-echo https PORT --cert PEM --key PEM [--client-ca PEM] [--name NAME]
  strait-echo tcp PORT
  strait-echo dns PORT --record NAME=IP[,IP...]...
  strait-echo probe IP:PORT [--timeout-ms N]
  strait-echo send IP:PORT --bytes N [--timeout-secs N]
  strait-echo hold IP:PORT --secs S
  strait-echo flood IP:PORT --connections N --secs S
  strait-echo sweep IP:PORT --source IP --ports FIRST-LAST [--timeout-ms N]
  strait-echo get URL [--count N] [--header 'Name: value']... [--timeout-ms N] [--concurrency C]
  strait-echo ws URL --message TEXT [--timeout-ms N]
  strait-echo grpc-call IP:PORT --message TEXT [--authority HOST] [--status N] [--timeout-ms N]
  strait-echo abuse IP:PORT --mode partial-head|invalid-chunked|abort-upload|stalled-body|
      silent|idle-keepalive|h2-idle [--connections N] [--bytes N] [--hold-secs S] [--host HOST]
      [--path PATH]
  strait-echo rapid-reset IP:PORT --streams N [--burst N] [--gap-ms N] [--authority HOST]
      [--path PATH] [--end-stream true|false]";

/// Client timeout unless `--timeout-ms` says otherwise.
const DEFAULT_TIMEOUT_MS: u64 = 5000;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("strait-echo: {message}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// Runs the subcommand; `Err` is a usage error.
fn run(args: &[String]) -> Result<ExitCode, String> {
    let (command, rest) = args.split_first().ok_or("missing subcommand")?;
    let (positional, rest) = rest.split_first().ok_or("missing PORT or IP:PORT")?;
    match command.as_str() {
        "http" | "grpc" => {
            let opts = Options::parse(rest, &["--name", "--delay-ms", "--http-version"])?;
            let http10 = match opts.get("--http-version") {
                None | Some("1.1") => false,
                Some("1.0") if command == "http" => true,
                Some(other) => return Err(format!("bad --http-version {other:?}")),
            };
            let config = ServerConfig {
                name: opts.get("--name").unwrap_or("strait-echo").to_string(),
                delay: Duration::from_millis(opts.parse_or("--delay-ms", 0)?),
                http10,
            };
            let port = parse(positional, "PORT")?;
            let serve = if command == "http" { http::serve } else { grpc::serve };
            Ok(serve_result(serve(port, config)))
        }
        "https" => {
            let opts = Options::parse(rest, &["--name", "--cert", "--key", "--client-ca"])?;
            let files = tls::TlsFiles {
                cert: opts.get("--cert").ok_or("https needs --cert PEM")?.to_owned(),
                key: opts.get("--key").ok_or("https needs --key PEM")?.to_owned(),
                client_ca: opts.get("--client-ca").map(str::to_owned),
            };
            let name = opts.get("--name").unwrap_or("strait-echo").to_owned();
            Ok(serve_result(tls::serve(parse(positional, "PORT")?, name, files)))
        }
        "tcp" => {
            Options::parse(rest, &[])?;
            Ok(serve_result(tcp::serve(parse(positional, "PORT")?)))
        }
        "dns" => {
            let opts = Options::parse(rest, &["--record"])?;
            let table: dns::Table = opts.get_all("--record").map(dns::parse_record).collect::<Result<_, _>>()?;
            Ok(serve_result(dns::serve(parse(positional, "PORT")?, &table)))
        }
        "probe" => {
            let opts = Options::parse(rest, &["--timeout-ms"])?;
            let millis = opts.parse_or("--timeout-ms", 1000)?;
            Ok(exit(tcp::probe(positional, Duration::from_millis(millis))))
        }
        "send" => {
            let opts = Options::parse(rest, &["--bytes", "--timeout-secs"])?;
            let bytes = parse(opts.get("--bytes").ok_or("send needs --bytes N")?, "--bytes")?;
            let secs = opts.parse_or("--timeout-secs", 30)?;
            let result = tcp::send(positional, bytes, Duration::from_secs(secs));
            match &result {
                Ok(report) => println!("{}", report.summary()),
                Err(message) => println!("send failed: {message}"),
            }
            Ok(exit(result.is_ok()))
        }
        "hold" => {
            let opts = Options::parse(rest, &["--secs"])?;
            let secs: f64 = parse(opts.get("--secs").ok_or("hold needs --secs S")?, "--secs")?;
            let duration = Duration::try_from_secs_f64(secs).map_err(|e| format!("bad --secs: {e}"))?;
            let result = tcp::hold(positional, duration);
            if let Err(message) = &result {
                println!("{message}");
            }
            Ok(exit(result.is_ok()))
        }
        "flood" => {
            let opts = Options::parse(rest, &["--connections", "--secs"])?;
            let connections = parse(opts.get("--connections").ok_or("flood needs --connections N")?, "--connections")?;
            let secs = parse(opts.get("--secs").ok_or("flood needs --secs S")?, "--secs")?;
            let target = parse(positional, "IP:PORT")?;
            let report = flood::flood(target, connections, Duration::from_secs(secs)).map_err(|e| e.to_string())?;
            println!("{}", report.to_json());
            Ok(ExitCode::SUCCESS)
        }
        "sweep" => {
            let opts = Options::parse(rest, &["--source", "--ports", "--timeout-ms"])?;
            let source = parse(opts.get("--source").ok_or("sweep needs --source IP")?, "--source")?;
            let ports = opts.get("--ports").ok_or("sweep needs --ports FIRST-LAST")?;
            let (first, last) = ports.split_once('-').ok_or("--ports is FIRST-LAST")?;
            let ports = parse(first, "--ports")?..=parse(last, "--ports")?;
            let timeout = Duration::from_millis(opts.parse_or("--timeout-ms", 1000)?);
            let target = parse(positional, "IP:PORT")?;
            let report = flood::sweep(source, ports, target, timeout).map_err(|e| e.to_string())?;
            println!("{}", report.to_json());
            Ok(exit(report.failed == 0))
        }
        "get" => {
            let opts = Options::parse(rest, &["--count", "--header", "--timeout-ms", "--concurrency"])?;
            let url = HttpUrl::parse(positional)?;
            let headers = opts
                .get_all("--header")
                .map(|h| match h.split_once(':') {
                    Some((name, value)) if !name.trim().is_empty() => Ok((name.trim().into(), value.trim().into())),
                    _ => Err(format!("--header {h:?} is not 'Name: value'")),
                })
                .collect::<Result<_, String>>()?;
            let options = GetOptions {
                count: opts.parse_or("--count", 1)?,
                headers,
                timeout: Duration::from_millis(opts.parse_or("--timeout-ms", DEFAULT_TIMEOUT_MS)?),
                concurrency: opts.parse_or("--concurrency", 1)?,
            };
            let summary = client::get(&url, &options);
            println!("{}", summary.to_json());
            Ok(exit(summary.errors == 0))
        }
        "ws" => {
            let opts = Options::parse(rest, &["--message", "--timeout-ms"])?;
            let url = HttpUrl::parse(positional)?;
            let message = opts.get("--message").ok_or("ws needs --message TEXT")?;
            let timeout = Duration::from_millis(opts.parse_or("--timeout-ms", DEFAULT_TIMEOUT_MS)?);
            let report = websocket::check_echo(&url, message, timeout);
            println!("{}", report.to_json());
            Ok(exit(report.error.is_none()))
        }
        "grpc-call" => {
            let opts = Options::parse(rest, &["--message", "--authority", "--status", "--timeout-ms"])?;
            let message = opts.get("--message").ok_or("grpc-call needs --message TEXT")?;
            let mut options = grpc::CallOptions::new(positional, opts.get("--authority"), message)?;
            options.status = opts.get("--status").map(|s| parse(s, "--status")).transpose()?;
            options.timeout = Duration::from_millis(opts.parse_or("--timeout-ms", DEFAULT_TIMEOUT_MS)?);
            let reply = grpc::call(&options);
            println!("{}", reply.to_json());
            Ok(exit(reply.grpc_status.is_some()))
        }
        "abuse" => {
            let known = ["--mode", "--connections", "--bytes", "--hold-secs", "--host", "--path"];
            let opts = Options::parse(rest, &known)?;
            let secs: f64 = opts.parse_or("--hold-secs", 10.0)?;
            let options = AbuseOptions {
                addr: tcp::resolve(positional).map_err(|e| format!("bad target {positional:?}: {e}"))?,
                host: opts.get("--host").unwrap_or(positional).to_string(),
                path: opts.get("--path").unwrap_or("/").to_string(),
                mode: abuse::Mode::parse(opts.get("--mode").ok_or("abuse needs --mode")?)?,
                connections: opts.parse_or("--connections", 1)?,
                body_bytes: opts.parse_or("--bytes", 1024)?,
                hold: Duration::try_from_secs_f64(secs).map_err(|e| format!("bad --hold-secs: {e}"))?,
            };
            let report = abuse::run(&options);
            println!("{}", report.to_json());
            Ok(exit(report.errors == 0))
        }
        "rapid-reset" => {
            let known = ["--streams", "--burst", "--gap-ms", "--authority", "--path", "--end-stream"];
            let opts = Options::parse(rest, &known)?;
            let options = RapidResetOptions {
                addr: tcp::resolve(positional).map_err(|e| format!("bad target {positional:?}: {e}"))?,
                authority: opts.get("--authority").unwrap_or(positional).to_string(),
                path: opts.get("--path").unwrap_or("/").to_string(),
                streams: parse(opts.get("--streams").ok_or("rapid-reset needs --streams N")?, "--streams")?,
                burst: opts.parse_or("--burst", 100)?,
                gap: Duration::from_millis(opts.parse_or("--gap-ms", 0)?),
                end_stream: opts.parse_or("--end-stream", true)?,
            };
            let report = rapid_reset::run(&options);
            println!("{}", report.to_json());
            Ok(exit(report.streams == options.streams))
        }
        other => Err(format!("unknown subcommand {other:?}")),
    }
}

fn exit(success: bool) -> ExitCode {
    if success { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// Servers only return on a bind or accept failure.
fn serve_result(result: std::io::Result<()>) -> ExitCode {
    if let Err(err) = &result {
        eprintln!("strait-echo: {err}");
    }
    exit(result.is_ok())
}

fn parse<T: std::str::FromStr>(value: &str, what: &str) -> Result<T, String> {
    value.parse().map_err(|_| format!("bad {what} {value:?}"))
}

/// `--flag VALUE` pairs after the positional argument.
struct Options<'a>(Vec<(&'a str, &'a str)>);

impl<'a> Options<'a> {
    fn parse(args: &'a [String], known: &[&str]) -> Result<Options<'a>, String> {
        let mut pairs = Vec::new();
        for pair in args.chunks(2) {
            let flag = pair[0].as_str();
            if !known.contains(&flag) {
                return Err(format!("unexpected argument {flag:?}"));
            }
            let value = pair.get(1).ok_or_else(|| format!("{flag} needs a value"))?;
            pairs.push((flag, value.as_str()));
        }
        Ok(Options(pairs))
    }

    /// The last value given for `flag`.
    fn get(&self, flag: &str) -> Option<&'a str> {
        self.0.iter().rev().find(|(f, _)| *f == flag).map(|(_, v)| *v)
    }

    /// Every value given for a repeatable `flag`, in order.
    fn get_all<'s>(&'s self, flag: &'s str) -> impl Iterator<Item = &'a str> + 's {
        self.0.iter().filter(move |(f, _)| *f == flag).map(|(_, v)| *v)
    }

    fn parse_or<T: std::str::FromStr>(&self, flag: &str, default: T) -> Result<T, String> {
        self.get(flag).map_or(Ok(default), |v| parse(v, flag))
    }
}
