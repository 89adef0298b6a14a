//! `shop.user.v1.UserService` over gRPC: validate, check that the caller may
//! act on the user named (a user principal only on itself, see
//! `shop_host::auth`), run the command, map the outcome to a response or a
//! status. Which methods a caller may call at all was decided before, by
//! the host's authentication layer.

use diesel_async::AsyncPgConnection;
use shop_contracts::user as pb;
use shop_contracts::user::user_service_server::UserService;
use shop_database::Pool;
use shop_host::auth::principal;
use shop_outbox::Wake;
use tonic::{Request, Response, Status};

use tracing::Instrument as _;

use crate::error::Error;
use crate::resync;
use crate::store::{self, NewUser, UserChange};
use crate::validate::{self, Deletion, Page};

/// The gRPC handlers, over a connection pool.
#[derive(Clone)]
pub struct UserGrpc {
    pool: Pool,
    resync_max_per_second: u32,
    /// Told of every committed event, after its commit, so the relays
    /// publish it at once.
    wake: Wake,
}

impl std::fmt::Debug for UserGrpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserGrpc").finish_non_exhaustive()
    }
}

impl UserGrpc {
    /// Handlers using `pool`, waking the relays through `wake`, resyncs
    /// bound to [`resync::DEFAULT_MAX_PER_SECOND`].
    pub fn new(pool: Pool, wake: Wake) -> Self {
        Self {
            pool,
            resync_max_per_second: resync::DEFAULT_MAX_PER_SECOND,
            wake,
        }
    }

    /// The same handlers with resyncs bound to `max_per_second` snapshots
    /// a second (`RESYNC_MAX_PER_SECOND`): the default and the most a
    /// caller may ask for.
    pub fn with_resync_max_per_second(mut self, max_per_second: u32) -> Self {
        self.resync_max_per_second = max_per_second.max(1);
        self
    }

    /// Runs `work` on a pooled connection within the database deadline
    /// (a silent connection is discarded and the call is `UNAVAILABLE`).
    async fn run<T>(
        &self,
        work: impl AsyncFnOnce(&mut AsyncPgConnection) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.pool.run(work).await
    }
}

#[tonic::async_trait]
impl UserService for UserGrpc {
    type ResyncUsersStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<pb::ResyncUsersProgress, Status>> + Send + 'static>,
    >;

    #[tracing::instrument(name = "resync_users", skip_all, err)]
    async fn resync_users(
        &self,
        request: Request<pb::ResyncUsersRequest>,
    ) -> Result<Response<Self::ResyncUsersStream>, Status> {
        let resync = validate::resync(request.get_ref(), self.resync_max_per_second).map_err(Error::from)?;
        let (sender, receiver) = tokio::sync::mpsc::channel(1);
        // Its own task, in this call's span (so the snapshots carry the
        // call's trace): it notices between batches that the caller left.
        tokio::spawn(
            resync::run(self.pool.clone(), self.wake.clone(), resync, sender)
                .instrument(tracing::Span::current()),
        );
        let stream = futures::stream::unfold(receiver, async |mut receiver| {
            receiver.recv().await.map(|progress| (progress, receiver))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        let new = NewUser::try_from(request.into_inner()).map_err(Error::from)?;
        let user = self
            .run(async |conn| store::create_user(conn, &new).await)
            .await?;
        self.wake.committed(&user.id.to_string());
        Ok(Response::new(pb::CreateUserResponse {
            user: Some(user.into()),
        }))
    }

    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        let id = validate::get_user(request.get_ref()).map_err(Error::from)?;
        principal(&request)?.check_owner(id)?;
        let user = self
            .run(async |conn| store::find(conn, id).await)
            .await?
            .ok_or(Error::NotFound(id))?;
        Ok(Response::new(pb::GetUserResponse {
            user: Some(user.into()),
        }))
    }

    async fn update_user(
        &self,
        request: Request<pb::UpdateUserRequest>,
    ) -> Result<Response<pb::UpdateUserResponse>, Status> {
        let principal = principal(&request)?.clone();
        let change = UserChange::try_from(request.into_inner()).map_err(Error::from)?;
        principal.check_owner(change.id)?;
        let user = self
            .run(async |conn| store::update_user(conn, &change).await)
            .await?;
        self.wake.committed(&user.id.to_string());
        Ok(Response::new(pb::UpdateUserResponse {
            user: Some(user.into()),
        }))
    }

    async fn delete_user(
        &self,
        request: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        let principal = principal(&request)?.clone();
        let deletion = Deletion::try_from(request.into_inner()).map_err(Error::from)?;
        principal.check_owner(deletion.id)?;
        self.run(async |conn| store::delete_user(conn, deletion.id, deletion.expected_version).await)
            .await?;
        self.wake.committed(&deletion.id.to_string());
        Ok(Response::new(pb::DeleteUserResponse {}))
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let page = Page::try_from(request.into_inner()).map_err(Error::from)?;
        // One extra row tells whether another page follows.
        let mut users = self
            .run(async |conn| store::list(conn, page.after, page.size + 1).await)
            .await?;
        let mut next_page_token = String::new();
        if users.len() > page.size as usize {
            users.truncate(page.size as usize);
            if let Some(last) = users.last() {
                next_page_token = validate::page_token(last.id);
            }
        }
        Ok(Response::new(pb::ListUsersResponse {
            users: users.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
    }
}
