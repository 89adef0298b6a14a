//! `shop-node user|order`: one service, configured from the environment like
//! its own binary, for the tests that run services as processes they can
//! kill.

fn main() -> anyhow::Result<()> {
    shop_host::arm_fault_points();
    let service = std::env::args().nth(1).unwrap_or_default();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(shop_cli::up::serve(&service))
}
