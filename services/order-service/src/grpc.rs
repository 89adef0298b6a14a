//! `shop.order.v1.OrderService` over gRPC: validate, check that the caller may
//! act on the user's orders (a user principal only on its own, see
//! `shop_host::auth`), run the command, map the outcome to a response or a
//! status. Which methods a caller may call at all was decided before, by
//! the host's authentication layer; whose orders it may touch is decided
//! here, by [`OrderGrpc::check_order_owner`] for the calls that name an
//! order and by `Principal::check_owner` for those that name a user.

use diesel_async::AsyncPgConnection;
use shop_contracts::order as pb;
use shop_contracts::order::order_service_server::OrderService;
use shop_database::Pool;
use shop_host::auth::{Principal, principal};
use shop_outbox::Wake;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::store::{self, NewOrder};
use crate::validate::{self, Cancellation, OrdersPage};

/// The gRPC handlers, over a connection pool.
#[derive(Clone)]
pub struct OrderGrpc {
    pool: Pool,
    /// Told of every committed event, after its commit, so the relays
    /// publish it at once.
    wake: Wake,
}

impl std::fmt::Debug for OrderGrpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderGrpc").finish_non_exhaustive()
    }
}

impl OrderGrpc {
    /// Handlers using `pool`, waking the relays through `wake`.
    pub fn new(pool: Pool, wake: Wake) -> Self {
        Self { pool, wake }
    }

    /// Runs `work` on a pooled connection within the database deadline
    /// (a silent connection is discarded and the call is `UNAVAILABLE`).
    async fn run<T>(
        &self,
        work: impl AsyncFnOnce(&mut AsyncPgConnection) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.pool.run(work).await
    }

    /// `Ok` when `principal` may act on order `id`: a service on any, a
    /// user on its own (the stored order's user). A missing order is
    /// `NOT_FOUND` only for those allowed to know.
    async fn check_order_owner(&self, principal: &Principal, id: uuid::Uuid) -> Result<(), Status> {
        if principal.user().is_none() {
            return Ok(());
        }
        let owner = self
            .run(async |conn| store::owner(conn, id).await)
            .await?
            .ok_or(Error::NotFound(id))?;
        principal.check_owner(owner)
    }
}

#[tonic::async_trait]
impl OrderService for OrderGrpc {
    async fn create_order(
        &self,
        request: Request<pb::CreateOrderRequest>,
    ) -> Result<Response<pb::CreateOrderResponse>, Status> {
        let principal = principal(&request)?.clone();
        let new = NewOrder::try_from(request.into_inner()).map_err(Error::from)?;
        principal.check_owner(new.user_id)?;
        let order = self
            .run(async |conn| store::create_order(conn, &new).await)
            .await?;
        self.wake.committed(&order.row.id.to_string());
        Ok(Response::new(pb::CreateOrderResponse {
            order: Some(order.into()),
        }))
    }

    async fn get_order(
        &self,
        request: Request<pb::GetOrderRequest>,
    ) -> Result<Response<pb::GetOrderResponse>, Status> {
        let id = validate::get_order(request.get_ref()).map_err(Error::from)?;
        self.check_order_owner(principal(&request)?, id).await?;
        let order = self
            .run(async |conn| store::find(conn, id).await)
            .await?
            .ok_or(Error::NotFound(id))?;
        Ok(Response::new(pb::GetOrderResponse {
            order: Some(order.into()),
        }))
    }

    async fn list_orders(
        &self,
        request: Request<pb::ListOrdersRequest>,
    ) -> Result<Response<pb::ListOrdersResponse>, Status> {
        let principal = principal(&request)?.clone();
        let page = OrdersPage::try_from(request.into_inner()).map_err(Error::from)?;
        principal.check_owner(page.user_id)?;
        // One extra row tells whether another page follows.
        let mut orders = self
            .run(async |conn| store::list(conn, page.user_id, page.after, page.size + 1).await)
            .await?;
        let mut next_page_token = String::new();
        if orders.len() > page.size as usize {
            orders.truncate(page.size as usize);
            if let Some(last) = orders.last() {
                next_page_token = shop_host::validate::page_token(last.row.id);
            }
        }
        Ok(Response::new(pb::ListOrdersResponse {
            orders: orders.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
    }

    async fn cancel_order(
        &self,
        request: Request<pb::CancelOrderRequest>,
    ) -> Result<Response<pb::CancelOrderResponse>, Status> {
        let principal = principal(&request)?.clone();
        let cancellation = Cancellation::try_from(request.into_inner()).map_err(Error::from)?;
        self.check_order_owner(&principal, cancellation.id).await?;
        let order = self
            .run(async |conn| store::cancel_order(conn, cancellation.id, cancellation.expected_version).await)
            .await?;
        self.wake.committed(&cancellation.id.to_string());
        Ok(Response::new(pb::CancelOrderResponse {
            order: Some(order.into()),
        }))
    }
}
