//! `order-service [serve|relay|healthcheck]`; see `order-service --help`.

fn main() -> std::process::ExitCode {
    shop_host::cli::main::<order_service::OrderService>()
}
