//! `bench serve noop`: a gRPC server whose `CreateUser` does nothing, the
//! raw limit of a unary call. It answers with a user made from the request
//! (the same bytes on the wire as the user service's answer) and runs as a
//! process of its own, as the user service does, so its CPU is its own.

use shop_contracts::user as pb;
use shop_contracts::user::user_service_server::{UserService, UserServiceServer};
use tonic::{Request, Response, Status};

/// The user service's API, answering `CreateUser` without doing anything.
struct Noop;

#[tonic::async_trait]
impl UserService for Noop {
    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        let request = request.into_inner();
        let now = shop_contracts::prost_types::Timestamp::from(std::time::SystemTime::now());
        Ok(Response::new(pb::CreateUserResponse {
            user: Some(pb::User {
                id: "0190c8e4-0000-7000-8000-000000000000".to_owned(),
                email: request.email,
                name: request.name,
                version: 1,
                created_at: Some(now),
                updated_at: Some(now),
            }),
        }))
    }

    async fn get_user(
        &self,
        _: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        Err(Status::unimplemented("noop"))
    }

    async fn update_user(
        &self,
        _: Request<pb::UpdateUserRequest>,
    ) -> Result<Response<pb::UpdateUserResponse>, Status> {
        Err(Status::unimplemented("noop"))
    }

    async fn delete_user(
        &self,
        _: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        Err(Status::unimplemented("noop"))
    }

    async fn list_users(
        &self,
        _: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        Err(Status::unimplemented("noop"))
    }

    type ResyncUsersStream = futures::stream::Empty<Result<pb::ResyncUsersProgress, Status>>;

    async fn resync_users(
        &self,
        _: Request<pb::ResyncUsersRequest>,
    ) -> Result<Response<Self::ResyncUsersStream>, Status> {
        Err(Status::unimplemented("noop"))
    }
}

/// Serves on `GRPC_ADDR` (`127.0.0.1:0` by default) until SIGTERM or
/// SIGINT; says where in a JSON line, as the services do.
pub(crate) async fn serve() -> anyhow::Result<()> {
    let addr: std::net::SocketAddr = std::env::var("GRPC_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:0".to_owned())
        .parse()?;
    // TCP_NODELAY, as the services' listener.
    let incoming = tonic::transport::server::TcpIncoming::bind(addr)?.with_nodelay(Some(true));
    let local = incoming.local_addr()?;
    println!(
        "{}",
        serde_json::json!({"message": "noop service started", "addr": local.to_string()})
    );
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tonic::transport::Server::builder()
        .add_service(UserServiceServer::new(Noop))
        .serve_with_incoming_shutdown(incoming, async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        })
        .await?;
    Ok(())
}
