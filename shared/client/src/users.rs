//! The user service client.

use shop_contracts::user as pb;
use shop_contracts::user::user_service_client::UserServiceClient;
use uuid::Uuid;

use crate::retry::{Repeat, TracedChannel, channel, with_retries};
use crate::{ClientConfig, Error, Page, ResyncProgress, User};

/// What an update changes; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserUpdate {
    /// New email.
    pub email: Option<String>,
    /// New name.
    pub name: Option<String>,
}

/// Calls `shop.user.v1.UserService`. Cheap to clone; clones share the
/// connection.
#[derive(Debug, Clone)]
pub struct UserClient {
    inner: UserServiceClient<TracedChannel>,
    config: ClientConfig,
}

impl UserClient {
    /// A client for `config`. The connection is made on the first call (and
    /// again whenever it breaks), so this fails only on invalid settings.
    pub fn connect(config: ClientConfig) -> Result<Self, Error> {
        Ok(Self {
            inner: UserServiceClient::new(channel(&config)?),
            config,
        })
    }

    /// Creates a user. Retried safely: the request carries a request id
    /// generated here once, so a retry returns the user the first attempt
    /// created.
    pub async fn create_user(&self, email: &str, name: &str) -> Result<User, Error> {
        self.create_user_with_request_id(email, name, Uuid::new_v4())
            .await
    }

    /// Creates a user with the caller's request id (for callers that retry
    /// across processes themselves).
    pub async fn create_user_with_request_id(
        &self,
        email: &str,
        name: &str,
        request_id: Uuid,
    ) -> Result<User, Error> {
        let message = pb::CreateUserRequest {
            email: email.to_owned(),
            name: name.to_owned(),
            request_id: request_id.to_string(),
        };
        let response = with_retries(&self.config, Repeat::Safe, message, |request| {
            let mut client = self.inner.clone();
            async move { client.create_user(request).await }
        })
        .await?;
        user(response.user)
    }

    /// One user.
    pub async fn get_user(&self, id: &str) -> Result<User, Error> {
        let message = pb::GetUserRequest { id: id.to_owned() };
        let response = with_retries(&self.config, Repeat::Safe, message, |request| {
            let mut client = self.inner.clone();
            async move { client.get_user(request).await }
        })
        .await?;
        user(response.user)
    }

    /// Changes a user seen at `expected_version`.
    pub async fn update_user(
        &self,
        id: &str,
        expected_version: i64,
        update: UserUpdate,
    ) -> Result<User, Error> {
        let message = pb::UpdateUserRequest {
            id: id.to_owned(),
            expected_version,
            email: update.email,
            name: update.name,
        };
        let response = with_retries(&self.config, Repeat::OnlyWhenUnavailable, message, |request| {
            let mut client = self.inner.clone();
            async move { client.update_user(request).await }
        })
        .await?;
        user(response.user)
    }

    /// Deletes a user seen at `expected_version`.
    pub async fn delete_user(&self, id: &str, expected_version: i64) -> Result<(), Error> {
        let message = pb::DeleteUserRequest {
            id: id.to_owned(),
            expected_version,
        };
        with_retries(&self.config, Repeat::OnlyWhenUnavailable, message, |request| {
            let mut client = self.inner.clone();
            async move { client.delete_user(request).await }
        })
        .await?;
        Ok(())
    }

    /// One page of users in creation order; `page_size` `None` means the
    /// server's default (50).
    pub async fn list_users(&self, page_size: Option<i32>, page_token: &str) -> Result<Page<User>, Error> {
        let message = pb::ListUsersRequest {
            page_size,
            page_token: page_token.to_owned(),
        };
        let response = with_retries(&self.config, Repeat::Safe, message, |request| {
            let mut client = self.inner.clone();
            async move { client.list_users(request).await }
        })
        .await?;
        Ok(Page {
            items: response.users,
            next_page_token: response.next_page_token,
        })
    }
}

/// Which users [`UserClient::resync_users`] republishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResyncSelection {
    /// These users (at most 1000, none twice); deleted ones get a deleted
    /// snapshot.
    Users(Vec<String>),
    /// Users created, updated or deleted at or after this time.
    ChangedSince(std::time::SystemTime),
    /// Every user, deleted ones included.
    All,
}

impl UserClient {
    /// Republishes the current state of the selected users as
    /// `UserSnapshot` events (needs the `users:resync` permission), at most
    /// `max_per_second` a second (`None`: the server's bound), calling
    /// `on_progress` with each progress message; returns the last one,
    /// which carries the ids the service never knew.
    ///
    /// The call runs as long as the resync does: the deadline
    /// ([`ClientConfig::timeout`]) bounds the wait for each message, not
    /// the whole call. It is not retried (what it wrote stays written, and
    /// a repeat writes every snapshot again): call it again to go on.
    /// Dropping the future cancels the resync between two batches.
    pub async fn resync_users(
        &self,
        selection: ResyncSelection,
        max_per_second: Option<i32>,
        mut on_progress: impl FnMut(&ResyncProgress),
    ) -> Result<ResyncProgress, Error> {
        use pb::resync_users_request::Selection;

        let selection = match selection {
            ResyncSelection::Users(ids) => Selection::Users(pb::UserIds { ids }),
            ResyncSelection::ChangedSince(since) => Selection::ChangedSince(since.into()),
            ResyncSelection::All => Selection::All(true),
        };
        let request = pb::ResyncUsersRequest {
            selection: Some(selection),
            max_per_second,
        };
        let deadline = self.config.timeout;
        let late = || {
            Error::from(tonic::Status::deadline_exceeded(
                "no progress from the resync within the deadline",
            ))
        };
        let mut client = self.inner.clone();
        let mut stream = tokio::time::timeout(deadline, client.resync_users(request))
            .await
            .map_err(|_| late())??
            .into_inner();
        let mut last = None;
        while let Some(progress) = tokio::time::timeout(deadline, stream.message())
            .await
            .map_err(|_| late())??
        {
            on_progress(&progress);
            last = Some(progress);
        }
        last.ok_or_else(|| Error::Server {
            code: tonic::Code::Internal,
            message: "the resync ended without progress".to_owned(),
        })
    }
}

fn user(user: Option<User>) -> Result<User, Error> {
    user.ok_or_else(|| Error::Server {
        code: tonic::Code::Internal,
        message: "the response carries no user".to_owned(),
    })
}
