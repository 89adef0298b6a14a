CREATE TABLE orders (
    id          UUID PRIMARY KEY,
    user_id     UUID NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('PENDING', 'CANCELLED')),
    version     BIGINT NOT NULL CHECK (version >= 1),
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);

-- ListOrders: a user's orders in id (creation) order.
CREATE INDEX orders_user_id ON orders (user_id, id);

CREATE TABLE order_items (
    order_id    UUID NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    line        SMALLINT NOT NULL,
    product_id  TEXT NOT NULL,
    quantity    INTEGER NOT NULL CHECK (quantity BETWEEN 1 AND 1000),
    PRIMARY KEY (order_id, line)
);

-- CreateOrder requests that carried a request_id: a repeat returns the order
-- created the first time and writes nothing. `fingerprint` identifies the
-- request's content, so a reused request_id with other content is refused.
CREATE TABLE create_order_requests (
    request_id   UUID PRIMARY KEY,
    order_id     UUID NOT NULL,
    fingerprint  TEXT NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
