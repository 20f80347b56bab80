//! `sqlx::migrate!` embeds the migrations when this crate compiles; without this, adding a
//! migration file would not recompile it, and a build would run with the older set.

fn main() {
    println!("cargo:rerun-if-changed=../../migrations/personal_keys");
}
