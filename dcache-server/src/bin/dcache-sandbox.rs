//! `dcache-sandbox`: the compile launcher alone, for programs that embed the server library
//! and cannot (or prefer not to) re-execute themselves as the launcher.
//!
//! `dcache-sandbox __dcache-sandbox …` restricts itself and executes the compiler; see
//! `dcache_server::sandbox`. Run any other way it explains itself and exits.

fn main() -> std::process::ExitCode {
    dcache_server::sandbox::run_launcher_if_requested();
    eprintln!(
        "dcache-sandbox is started by dcache-server for each compile, as \
         `dcache-sandbox {} …`; it is not meant to be run by hand",
        dcache_server::sandbox::LAUNCHER_ARG
    );
    std::process::ExitCode::from(2)
}
