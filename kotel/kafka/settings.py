"""Kafka connection settings: validated once, mapped straight onto librdkafka / aiokafka options."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator

from kotel.topology.base import Model


class SaslSettings(Model):
    mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    username: str = ""
    password: SecretStr = SecretStr("")


class TlsSettings(Model):
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    key_password: SecretStr | None = None
    insecure_skip_verify: bool = False


class KafkaSettings(Model):
    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "kotel"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl: SaslSettings | None = None
    tls: TlsSettings | None = None
    # Escape hatch for librdkafka options kotel does not model; never for secrets (they would be logged).
    librdkafka: dict[str, str | int | float | bool] = Field(default_factory=dict)

    @field_validator("bootstrap_servers", mode="before")
    @classmethod
    def _join_list(cls, value: Any) -> Any:
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        if isinstance(value, str):
            for server in value.split(","):
                host, sep, port = server.strip().rpartition(":")
                if not sep or not host or not port.isdigit():
                    raise ValueError(f"expected host:port[,host:port...], got {value!r}")
        return value

    def librdkafka_config(self) -> dict[str, Any]:
        """Common client options for confluent-kafka producers, consumers and the AdminClient."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "security.protocol": self.security_protocol,
            # librdkafka leaves Nagle on: a small request sent while an earlier one on the connection
            # is unacknowledged (pipelined produces, anything behind a long-polling fetch) waits for
            # that ACK, which the kernel may delay by up to 40 ms. Kafka's own clients disable it.
            "socket.nagle.disable": True,
        }
        if self.sasl is not None:
            conf["sasl.mechanism"] = self.sasl.mechanism
            conf["sasl.username"] = self.sasl.username
            conf["sasl.password"] = self.sasl.password.get_secret_value()
        if self.tls is not None:
            if self.tls.ca_file:
                conf["ssl.ca.location"] = self.tls.ca_file
            if self.tls.cert_file:
                conf["ssl.certificate.location"] = self.tls.cert_file
            if self.tls.key_file:
                conf["ssl.key.location"] = self.tls.key_file
            if self.tls.key_password is not None:
                conf["ssl.key.password"] = self.tls.key_password.get_secret_value()
            if self.tls.insecure_skip_verify:
                conf["enable.ssl.certificate.verification"] = False
        conf.update(self.librdkafka)
        return conf

    def aiokafka_config(self) -> dict[str, Any]:
        """The same connection for aiokafka (Faust's transport)."""
        conf: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.sasl is not None:
            conf["sasl_mechanism"] = self.sasl.mechanism
            conf["sasl_plain_username"] = self.sasl.username
            conf["sasl_plain_password"] = self.sasl.password.get_secret_value()
        return conf
