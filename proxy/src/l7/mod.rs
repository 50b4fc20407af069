//! The HTTP engine shared by waypoints and gateways: request authentication, routing and the
//! policies applied to each request.

pub mod jwt;
