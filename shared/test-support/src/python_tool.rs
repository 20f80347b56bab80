//! Python programs the tests drive (Schemathesis, an SMTP server), installed by the tests
//! themselves, so that a machine needs nothing for them but `python3` with `venv`.
//!
//! Each tool gets a virtual environment of its own, `target/tools/<name>-<version>`, into which
//! pip installs the pinned version on first use; later runs find it there. A file `installed`,
//! written last, marks an installation as complete: one that was interrupted is started over,
//! not used half done. A lock file beside it makes tests (and test binaries) that need the same
//! tool at the same time wait for one installation instead of undoing each other's.
//!
//! An environment variable named after the tool (`SCHEMATHESIS`, `AIOSMTPD`) set to the path of
//! its executable uses that one instead, for machines where pip cannot reach the package index.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Command;

use fs2::FileExt;

/// The executable `executable` of the Python package `name` at `version`: the one the variable
/// [`override_variable`]`(name)` names when set, else the one in the tool's virtual environment
/// under the target directory, installed first if need be.
///
/// Blocks while pip runs (seconds, once per version and target directory); panics with what to
/// install when the machine has no `python3 -m venv`, or when pip fails.
pub fn installed(name: &str, version: &str, executable: &str) -> PathBuf {
    let variable = override_variable(name);
    if let Some(path) = std::env::var_os(&variable) {
        return PathBuf::from(path);
    }
    let tools = target_directory().join("tools");
    std::fs::create_dir_all(&tools)
        .unwrap_or_else(|error| panic!("creating {}: {error}", tools.display()));
    let venv = tools.join(format!("{name}-{version}"));
    let lock_path = tools.join(format!("{name}-{version}.lock"));
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .unwrap_or_else(|error| panic!("opening {}: {error}", lock_path.display()));
    lock.lock_exclusive()
        .unwrap_or_else(|error| panic!("locking {}: {error}", lock_path.display()));
    install(name, version, &venv, &variable, executable);
    let _ = FileExt::unlock(&lock);
    venv.join("bin").join(executable)
}

/// The environment variable that names another executable for the tool `name`: its name in
/// capitals, with `_` for anything but letters and digits (`SCHEMATHESIS`, `AIOSMTPD`).
pub fn override_variable(name: &str) -> String {
    name.chars()
        .map(|character| {
            if character.is_ascii_alphanumeric() {
                character.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// Installs `name==version` into `venv` unless a complete installation is there.
fn install(name: &str, version: &str, venv: &Path, variable: &str, executable: &str) {
    let installed = venv.join("installed");
    if installed.exists() {
        return;
    }
    let _ = std::fs::remove_dir_all(venv);
    let created = Command::new("python3")
        .args(["-m", "venv"])
        .arg(venv)
        .output();
    let why = match created {
        Ok(output) if output.status.success() => None,
        Ok(output) => Some(String::from_utf8_lossy(&output.stderr).into_owned()),
        Err(error) => Some(format!("python3: {error}")),
    };
    if let Some(why) = why {
        panic!(
            "installing {name} {version} for the tests needs Python 3 with venv and pip \
             (Debian/Ubuntu: apt install python3-venv), or {variable}=<path to {executable}>:\n\
             {why}"
        );
    }
    let output = Command::new(venv.join("bin").join("pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .arg(format!("{name}=={version}"))
        .output()
        .unwrap_or_else(|error| panic!("running pip for {name}: {error}"));
    assert!(
        output.status.success(),
        "installing {name} {version} with pip failed (it needs the Python package index), or \
         set {variable}=<path to {executable}>:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Last: until this file is there, the next run starts the installation over.
    std::fs::write(&installed, version)
        .unwrap_or_else(|error| panic!("writing {}: {error}", installed.display()));
}

/// Cargo's target directory, from where the running executable is: a test in
/// `target/<profile>/deps/`, a binary (a benchmark) in `target/<profile>/`.
fn target_directory() -> PathBuf {
    let executable = std::env::current_exe().expect("finding the running executable");
    let mut directory = executable
        .parent()
        .expect("the running executable has a directory");
    if directory.ends_with("deps") {
        directory = directory.parent().expect("deps has a parent");
    }
    directory
        .parent()
        .expect("the profile directory has a parent")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tool_is_overridden_by_its_name_in_capitals() {
        assert_eq!(override_variable("schemathesis"), "SCHEMATHESIS");
        assert_eq!(override_variable("aiosmtpd"), "AIOSMTPD");
        assert_eq!(override_variable("some-tool.x"), "SOME_TOOL_X");
    }

    #[test]
    fn tools_are_installed_under_the_target_directory() {
        let target = target_directory();
        assert!(target.join("debug").is_dir() || target.join("release").is_dir());
        let executable = std::env::current_exe().unwrap();
        assert!(executable.starts_with(&target), "{}", target.display());
    }
}
