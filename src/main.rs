//! The `impasto` binary: parses the command line, installs logging, runs a subcommand and maps
//! errors to messages and exit codes. All work lives in the library; this file stays thin.

mod cli;

fn main() {
    std::process::exit(cli::main());
}
