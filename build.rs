//! Generates the raw SPANK bindings (`$OUT_DIR/spank_bindings.rs`) from the installed
//! `<slurm/spank.h>`.
//!
//! Only the part of the SPANK API the plugin uses is allowlisted, and every name in it exists
//! unchanged from Slurm 22.05 through 25.x. The exported `plugin_version` is the headers'
//! `SLURM_VERSION_NUMBER`: slurmd refuses a plugin whose major.minor differs from its own, so
//! the `.so` must be built against the headers of the Slurm that loads it.
//!
//! The header is looked for in `$SLURM_INCLUDE_DIR` (a `:`-separated list of directories that
//! each hold `slurm/spank.h`) when set, otherwise in /usr/include, /usr/local/include and
//! /opt/slurm/include. Debian and Ubuntu ship it in `libslurm-dev`, RHEL-likes in `slurm-devel`.

use std::env;
use std::path::{Path, PathBuf};

const HEADER: &str = "slurm/spank.h";
const DEFAULT_DIRS: [&str; 3] = ["/usr/include", "/usr/local/include", "/opt/slurm/include"];
/// Directories clang searches anyway: passing them with -I would reorder the system include
/// path for nothing.
const CLANG_DEFAULT_DIRS: [&str; 2] = ["/usr/include", "/usr/local/include"];

fn candidate_dirs() -> Vec<PathBuf> {
    println!("cargo:rerun-if-env-changed=SLURM_INCLUDE_DIR");
    match env::var_os("SLURM_INCLUDE_DIR") {
        Some(dirs) if !dirs.is_empty() => env::split_paths(&dirs).collect(),
        _ => DEFAULT_DIRS.iter().map(PathBuf::from).collect(),
    }
}

fn main() {
    let dirs = candidate_dirs();
    let Some(dir) = dirs.iter().find(|d| d.join(HEADER).is_file()) else {
        panic!(
            "cannot find {HEADER} in {dirs:?}: install the Slurm development headers \
             (Debian/Ubuntu: libslurm-dev, RHEL-likes: slurm-devel) or set SLURM_INCLUDE_DIR \
             to the directory that holds slurm/spank.h"
        );
    };
    for h in ["spank.h", "slurm_version.h", "slurm_errno.h"] {
        println!(
            "cargo:rerun-if-changed={}",
            dir.join("slurm").join(h).display()
        );
    }

    let mut builder = bindgen::Builder::default()
        .header(dir.join(HEADER).to_string_lossy())
        .rust_edition(bindgen::RustEdition::Edition2024)
        // Types.
        .allowlist_type("spank_t")
        .allowlist_type("spank_context_t")
        .allowlist_type("spank_item_t")
        .allowlist_type("spank_err_t")
        // Functions, all present in 22.05 and unchanged since.
        .allowlist_function("spank_context")
        .allowlist_function("spank_get_item")
        .allowlist_function("spank_strerror")
        .allowlist_function("slurm_info")
        .allowlist_function("slurm_error")
        .allowlist_function("slurm_verbose")
        .allowlist_function("slurm_debug")
        // Constants. S_CTX_*, S_JOB_* and ESPANK_* (but ESPANK_SUCCESS) are enum constants that
        // come with their types; ESPANK_SUCCESS and the version are #defines.
        .allowlist_var("SLURM_VERSION_NUMBER")
        .allowlist_var("ESPANK_SUCCESS")
        // `S_CTX_SLURMD` rather than `spank_context_S_CTX_SLURMD`. Enums stay integer
        // constants: a value Slurm adds later must not be undefined behaviour in Rust.
        .prepend_enum_name(false)
        .layout_tests(false)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    if !CLANG_DEFAULT_DIRS.iter().any(|d| Path::new(d) == dir) {
        builder = builder.clang_arg(format!("-I{}", dir.display()));
    }
    let bindings = builder
        .generate()
        .unwrap_or_else(|e| panic!("bindgen failed on {}: {e}", dir.join(HEADER).display()));

    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindings
        .write_to_file(out.join("spank_bindings.rs"))
        .expect("cannot write spank_bindings.rs");
}
