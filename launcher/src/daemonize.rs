//! daemonize
