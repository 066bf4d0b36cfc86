"""SPIFFE IDs: parsing, formatting and validation, in Consul's layout.

Theory of operation
-------------------
A SPIFFE ID is a URI ``spiffe://<trust-domain><path>`` (SPIFFE-ID.md §2). The rules
enforced here are the spec's, as go-spiffe enforces them:

* the scheme is exactly ``spiffe`` and is followed by ``//``;
* the trust domain (§2.1) is made of lowercase letters, digits, ``.``, ``-`` and
  ``_`` only, so it can carry no port, no userinfo and no percent-encoding, and is at
  most 255 bytes;
* the path (§2.2) is empty or a sequence of ``/segment``; a segment is non-empty, is
  not ``.`` or ``..``, and uses letters, digits, ``.``, ``-`` and ``_`` only; there is
  no trailing slash, no query and no fragment;
* the whole URI is at most 2048 bytes (§2.3).

On top of the spec, meshnode issues only the two identities Consul does (Consul
``agent/connect/uri_service.go`` and ``uri_agent.go``)::

    spiffe://<td>/ns/<namespace>/dc/<datacenter>/svc/<service>     a service instance
    spiffe://<td>/agent/client/dc/<datacenter>/id/<node>          an agent (node)

and the bare ``spiffe://<td>`` that Consul puts in its root certificates' URI SAN.

Consul names its trust domain ``<cluster-uuid>.consul``; we use
``<cluster-uuid>.meshnode`` unless ``ca.trust_domain`` is configured
(:func:`trust_domain_for`).
"""

from __future__ import annotations

import enum
import re
import uuid
from dataclasses import dataclass
from typing import Final

from ca.errors import CAError

SCHEME_PREFIX: Final = "spiffe://"
#: SPIFFE-ID.md §2.1: "Trust domain names ... MUST NOT exceed 255 bytes".
TRUST_DOMAIN_MAX_BYTES: Final = 255
#: SPIFFE-ID.md §2.3: "URIs with a total length longer than 2048 bytes SHOULD NOT be used".
#: We refuse them outright: nothing we issue comes near, so longer ones are garbage.
SPIFFE_ID_MAX_BYTES: Final = 2048
#: Suffix of trust domains we pick ourselves (Consul uses ``.consul``).
TRUST_DOMAIN_SUFFIX: Final = ".meshnode"
#: Consul's namespace when none is given (Consul CE has only this one).
DEFAULT_NAMESPACE: Final = "default"

_TRUST_DOMAIN_RE: Final = re.compile(r"[a-z0-9._-]+")
_SEGMENT_RE: Final = re.compile(r"[A-Za-z0-9._-]+")


class InvalidSpiffeId(CAError, ValueError):
    """A string is not a SPIFFE ID, or not one of the shapes meshnode issues.

    ``reason`` is a short bounded label for metrics; callers translate this into
    their own error (a CSR rejection, a refused peer certificate, a config error).
    """

    def __init__(self, reason: str, value: str = "") -> None:
        super().__init__(f"{reason}: {value[:80]!r}" if value else reason)
        self.reason = reason


class IdentityKind(enum.Enum):
    """What a SPIFFE ID names in meshnode (Consul's ``CertURI`` kinds)."""

    TRUST_DOMAIN = "trust_domain"
    """``spiffe://<td>``: carried by root certificates only."""
    SERVICE = "service"
    AGENT = "agent"
    OTHER = "other"
    """Valid per the SPIFFE spec, but not a shape meshnode issues or authorizes."""


def validate_trust_domain(name: str) -> str:
    """Return ``name`` if it is a valid SPIFFE trust domain, else raise.

    SPIFFE-ID.md §2.1: lowercase letters, digits, dots, dashes and underscores; no
    port, no userinfo; at most 255 bytes. Uppercase is refused rather than folded:
    an ID must have exactly one spelling so that string comparison is identity.
    """
    if not name:
        raise InvalidSpiffeId("empty_trust_domain")
    if len(name.encode()) > TRUST_DOMAIN_MAX_BYTES:
        raise InvalidSpiffeId("trust_domain_too_long", name)
    if not _TRUST_DOMAIN_RE.fullmatch(name):
        raise InvalidSpiffeId("bad_trust_domain", name)
    return name


def validate_segment(segment: str) -> str:
    """Return ``segment`` if it is a valid SPIFFE path segment (SPIFFE-ID.md §2.2)."""
    if not segment:
        raise InvalidSpiffeId("empty_segment")
    if segment in (".", ".."):
        raise InvalidSpiffeId("dot_segment", segment)
    if not _SEGMENT_RE.fullmatch(segment):
        raise InvalidSpiffeId("bad_segment", segment)
    return segment


def trust_domain_for(cluster_id: uuid.UUID | str, configured: str | None = None) -> str:
    """The trust domain of a cluster: ``configured`` if set, else ``<uuid>.meshnode``.

    Consul derives ``<cluster-uuid>.consul`` from the CA's cluster ID; we do the same
    with our own suffix so a meshnode and a Consul cluster never share a domain by
    accident. The UUID is made once by the first leader (randomness is the caller's)
    and kept in the replicated CA state.
    """
    if configured is not None:
        return validate_trust_domain(configured)
    try:
        parsed = cluster_id if isinstance(cluster_id, uuid.UUID) else uuid.UUID(cluster_id)
    except ValueError:
        raise InvalidSpiffeId("bad_cluster_id", str(cluster_id)) from None
    return validate_trust_domain(f"{parsed}{TRUST_DOMAIN_SUFFIX}")


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A validated SPIFFE ID. Build with :meth:`parse`, :meth:`service`, :meth:`agent`
    or :meth:`for_trust_domain`; ``str()`` gives the URI back, byte for byte."""

    trust_domain: str
    path: tuple[str, ...] = ()
    """The path's segments; empty for the trust domain's own ID."""

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        for segment in self.path:
            validate_segment(segment)
        if len(str(self).encode()) > SPIFFE_ID_MAX_BYTES:
            raise InvalidSpiffeId("too_long")

    # ------------------------------------------------------------------ constructors

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse a URI, enforcing SPIFFE-ID.md §2 strictly (no normalisation)."""
        if len(uri.encode("utf-8", "surrogatepass")) > SPIFFE_ID_MAX_BYTES:
            raise InvalidSpiffeId("too_long")
        if not uri.startswith(SCHEME_PREFIX):
            # Covers other schemes, a missing "//" and an uppercase "SPIFFE".
            raise InvalidSpiffeId("bad_scheme", uri)
        rest = uri[len(SCHEME_PREFIX) :]
        if "?" in rest or "#" in rest:
            raise InvalidSpiffeId("query_or_fragment", uri)
        trust_domain, slash, path = rest.partition("/")
        if "@" in trust_domain or ":" in trust_domain:
            # Already refused by the character set; named for a clearer reason.
            raise InvalidSpiffeId("userinfo_or_port", uri)
        if slash and not path:
            raise InvalidSpiffeId("trailing_slash", uri)
        segments = tuple(path.split("/")) if slash else ()
        if segments and segments[-1] == "":
            raise InvalidSpiffeId("trailing_slash", uri)
        return cls(trust_domain, segments)

    @classmethod
    def for_trust_domain(cls, trust_domain: str) -> SpiffeId:
        """``spiffe://<td>``, the URI SAN of root certificates (as Consul's roots)."""
        return cls(trust_domain)

    @classmethod
    def service(
        cls, trust_domain: str, datacenter: str, service: str, namespace: str = DEFAULT_NAMESPACE
    ) -> SpiffeId:
        """``spiffe://<td>/ns/<ns>/dc/<dc>/svc/<service>`` (Consul ``SpiffeIDService``)."""
        return cls(trust_domain, ("ns", namespace, "dc", datacenter, "svc", service))

    @classmethod
    def agent(cls, trust_domain: str, datacenter: str, node: str) -> SpiffeId:
        """``spiffe://<td>/agent/client/dc/<dc>/id/<node>`` (Consul ``SpiffeIDAgent``)."""
        return cls(trust_domain, ("agent", "client", "dc", datacenter, "id", node))

    # ------------------------------------------------------------------ views

    def __str__(self) -> str:
        return SCHEME_PREFIX + self.trust_domain + "".join("/" + s for s in self.path)

    @property
    def uri(self) -> str:
        """The URI, as it appears in a certificate's URI SAN."""
        return str(self)

    @property
    def kind(self) -> IdentityKind:
        """Which meshnode identity this is (by shape only)."""
        p = self.path
        if not p:
            return IdentityKind.TRUST_DOMAIN
        if len(p) == 6 and p[0] == "ns" and p[2] == "dc" and p[4] == "svc":
            return IdentityKind.SERVICE
        if len(p) == 6 and p[:3] == ("agent", "client", "dc") and p[4] == "id":
            return IdentityKind.AGENT
        return IdentityKind.OTHER

    @property
    def namespace(self) -> str | None:
        """The namespace of a service ID, else None."""
        return self.path[1] if self.kind is IdentityKind.SERVICE else None

    @property
    def datacenter(self) -> str | None:
        """The datacenter of a service or agent ID, else None."""
        kind = self.kind
        if kind is IdentityKind.SERVICE:
            return self.path[3]
        if kind is IdentityKind.AGENT:
            return self.path[3]
        return None

    @property
    def service_name(self) -> str | None:
        """The service of a service ID, else None."""
        return self.path[5] if self.kind is IdentityKind.SERVICE else None

    @property
    def node(self) -> str | None:
        """The node of an agent ID, else None."""
        return self.path[5] if self.kind is IdentityKind.AGENT else None
