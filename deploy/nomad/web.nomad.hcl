# An example service that registers itself with the meshnode agent of its host.
#
# meshnode serves a Consul-compatible agent API, so Nomad's own Consul integration is
# the registration path: with this in every client's configuration
#
#   consul {
#     address = "127.0.0.1:8500"   # the local meshnode agent (meshnode.nomad.hcl)
#     token   = "..."              # meshnode's acl.token: registrations are writes
#   }
#
# Nomad calls PUT /v1/agent/service/register on the local agent when the allocation
# starts and deregisters it when it stops. The agent runs the check itself, gossips
# the instance and its health to every other agent, and `meshnode catalog services`,
# `/v1/health/service/web?passing` and Consul clients on any host of the
# cluster find it.
#
#   nomad job run web.nomad.hcl

job "web" {
  type = "service"

  group "web" {
    count = 2

    # A dynamic host port: the agent registers host address + port, and the check
    # (run by the agent, on the host) reaches the task there.
    network {
      port "http" {
        to = 8080
      }
    }

    # Deregister first, then stop the task: the agents drop the instance from the
    # catalog (and the proxies stop routing to it) before connections are refused.
    shutdown_delay = "5s"

    service {
      # "consul" means: register through the Consul agent API at consul.address,
      # which is meshnode. "nomad" would keep the service in Nomad's own catalog,
      # invisible to meshnode and its proxies.
      provider = "consul"
      name     = "web"
      port     = "http"
      tags     = ["v1", "http"]

      meta {
        version = "1"
      }

      # Run by the meshnode agent every 10 s against host:port/health; the result is
      # gossiped, and instances failing it drop out of ?passing queries and routing.
      check {
        name     = "web-http"
        type     = "http"
        path     = "/health"
        interval = "10s"
        timeout  = "2s"
      }
    }

    task "web" {
      driver = "docker"

      config {
        image = "hashicorp/http-echo:1.0"
        ports = ["http"]
        # http-echo answers every path, /health included.
        args = ["-listen=:8080", "-text=hello from ${NOMAD_ALLOC_ID}"]
      }

      resources {
        cpu    = 50 # MHz
        memory = 32 # MiB
      }
    }
  }
}
