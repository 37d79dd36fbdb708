//! Man pages (`clap_mangen`) and shell completions (`clap_complete`) for the
//! binaries, written by each binary from its own command-line definition
//! when `cargo xtask dist` sets `JIT_GATE_WRITE_DOCS` to a directory.

use std::{path::Path, process::ExitCode};

use clap::CommandFactory;
use clap_complete::Shell;

/// The variable naming the directory to write into; set, the binary writes
/// and exits instead of running.
pub const WRITE_DOCS_VAR: &str = "JIT_GATE_WRITE_DOCS";

/// The shells completions are written for, and the directory each goes to
/// (below the output directory).
const SHELLS: [(Shell, &str); 3] = [
    (Shell::Bash, "bash"),
    (Shell::Zsh, "zsh"),
    (Shell::Fish, "fish"),
];

/// Writes `man1/<pages>` and `completions/<shell>/<file>` for `C` into the
/// directory `JIT_GATE_WRITE_DOCS` names, if set; returns the exit code then.
pub fn write_if_asked<C: CommandFactory>() -> Option<ExitCode> {
    let dir = std::env::var_os(WRITE_DOCS_VAR)?;
    match write::<C>(Path::new(&dir)) {
        Ok(()) => Some(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!(
                "writing man pages and completions to {}: {e}",
                dir.display()
            );
            Some(ExitCode::FAILURE)
        }
    }
}

fn write<C: CommandFactory>(dir: &Path) -> std::io::Result<()> {
    let command = C::command();
    let name = command.get_name().to_owned();
    let man = dir.join("man1");
    std::fs::create_dir_all(&man)?;
    clap_mangen::generate_to(command.clone(), &man)?;
    for (shell, sub) in SHELLS {
        let out = dir.join("completions").join(sub);
        std::fs::create_dir_all(&out)?;
        clap_complete::generate_to(shell, &mut command.clone(), &name, &out)?;
    }
    Ok(())
}
