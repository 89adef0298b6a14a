//! `user-service [serve|relay|healthcheck]`; see `user-service --help`.

fn main() -> std::process::ExitCode {
    shop_host::cli::main::<user_service::UserService>()
}
