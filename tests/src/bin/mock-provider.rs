//! The mock provider as a standalone process, for load benchmarks and manual
//! runs:
//!
//! ```text
//! mock-provider [--listen 127.0.0.1:0] [--no-record] [--no-rate-limit-headers] [--workers N]
//! ```
//!
//! Once listening it prints exactly one line, `listening on ADDR`, to stdout,
//! then serves until SIGTERM or SIGINT.

use std::io::Write;
use std::process::ExitCode;

use tollgate_e2e::mock_provider::{MockOptions, MockProvider};

const USAGE: &str =
    "usage: mock-provider [--listen ADDR] [--no-record] [--no-rate-limit-headers] [--workers N]

  --listen ADDR             address to listen on (default 127.0.0.1:0, a free port)
  --no-record               do not keep received requests (keeps memory flat under load)
  --no-rate-limit-headers   do not send x-ratelimit-* (or anthropic-ratelimit-*) headers
                            (sent by default, as real providers do; costs one short
                            mutex per keyed request)
  --workers N               tokio worker threads (default 1)";

struct Args {
    options: MockOptions,
    workers: usize,
}

/// What the command line asks for.
enum Command {
    Run(Args),
    Help,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Command, String> {
    let mut parsed = Args {
        options: MockOptions::default(),
        workers: 1,
    };
    while let Some(arg) = args.next() {
        // Accept both `--flag value` and `--flag=value`.
        let (flag, inline_value) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
            None => (arg, None),
        };
        let mut value = || {
            inline_value
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--listen" => {
                let addr = value()?;
                parsed.options.listen =
                    addr.parse().map_err(|e| format!("--listen {addr}: {e}"))?;
            }
            "--workers" => {
                let workers = value()?;
                parsed.workers = match workers.parse() {
                    Ok(n) if n > 0 => n,
                    _ => return Err(format!("--workers {workers}: expected a positive number")),
                };
            }
            "--no-record" if inline_value.is_none() => parsed.options.record = false,
            "--no-rate-limit-headers" if inline_value.is_none() => {
                parsed.options.rate_limit_headers = false;
            }
            "-h" | "--help" => return Ok(Command::Help),
            _ => return Err(format!("unexpected argument {flag}")),
        }
    }
    Ok(Command::Run(parsed))
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Command::Run(args)) => args,
        Ok(Command::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("mock-provider: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers)
        .enable_all()
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(run(args.options)),
        Err(e) => {
            eprintln!("mock-provider: cannot start the tokio runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(options: MockOptions) -> ExitCode {
    let listen = options.listen;
    let provider = match MockProvider::try_start_with(options).await {
        Ok(provider) => provider,
        Err(e) => {
            eprintln!("mock-provider: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Whoever started us waits for this line to learn the port.
    let mut stdout = std::io::stdout();
    let announced =
        writeln!(stdout, "listening on {}", provider.addr()).and_then(|()| stdout.flush());
    if let Err(e) = announced {
        eprintln!("mock-provider: cannot write to stdout: {e}");
        return ExitCode::FAILURE;
    }
    if let Err(e) = shutdown_signal().await {
        eprintln!("mock-provider: cannot listen for signals: {e}");
        return ExitCode::FAILURE;
    }
    drop(provider);
    ExitCode::SUCCESS
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}
