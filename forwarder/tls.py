"""SSL contexts for the client-facing TLS front and for verified TLS to the nodes, built from the config."""

from __future__ import annotations

import ssl

from forwarder.config import Config, ConfigError


def server_context(cfg: Config) -> ssl.SSLContext | None:
    """The TLS front for every forward, or None; raises ConfigError naming the file that cannot be loaded."""
    if cfg.tls is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cfg.tls.cert, cfg.tls.key)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"tls: {exc.filename} does not exist; tls.cert and tls.key must be readable PEM files"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"tls.cert/tls.key: cannot load {cfg.tls.cert} with {cfg.tls.key}: {exc}") from None
    if cfg.tls.client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_verify_locations(cafile=cfg.tls.client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"tls.client_ca: cannot load {cfg.tls.client_ca}: {exc}") from None
    return context


def upstream_context(cfg: Config) -> ssl.SSLContext | None:
    """TLS to the nodes, always verified (certificate chain and host name), or None."""
    if cfg.upstream_tls is None:
        return None
    try:
        # create_default_context sets CERT_REQUIRED and check_hostname; there is deliberately no way to turn them off.
        context = ssl.create_default_context(cafile=cfg.upstream_tls.ca)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"upstream_tls.ca: cannot load {cfg.upstream_tls.ca}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
