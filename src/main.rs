//! The `kiln` binary: parse arguments, run, report errors once.
//!
//! Exit codes: 0 success (and a closed stdout pipe), 1 an error, 2 bad arguments (clap).

use clap::Parser;

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();

    let cli = kiln::cli::Cli::parse();
    if let Err(err) = kiln::cli::run(cli) {
        let broken_pipe = err
            .chain()
            .filter_map(|e| e.downcast_ref::<std::io::Error>())
            .any(|e| e.kind() == std::io::ErrorKind::BrokenPipe);
        if broken_pipe {
            std::process::exit(0);
        }
        // Errors that print their cause in their own message also expose it as `source`: say it once.
        let mut chain: Vec<String> = Vec::new();
        for message in err.chain().map(|e| e.to_string()) {
            if !chain.last().is_some_and(|last| last.ends_with(&message)) {
                chain.push(message);
            }
        }
        eprintln!("kiln: {}", chain.join(": "));
        std::process::exit(1);
    }
}
