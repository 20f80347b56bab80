//! Delivery of integration events to webhook endpoints.
