# meshnode agent on every Nomad client.
#
#   nomad var put nomad/jobs/meshnode encrypt="$(meshnode keygen)" acl_token="$(openssl rand -hex 24)"
#   nomad job run -var 'retry_join=["10.0.0.1","10.0.0.2","10.0.0.3"]' meshnode.nomad.hcl
#
# Each client needs, once (as with deploy/systemd/README.md, steps 1 and 2):
#   - meshnode installed at /usr/local/bin/meshnode (a venv in /opt/meshnode + symlink);
#   - a `meshnode` user and its state directory:
#       useradd --system --user-group --no-create-home --shell /usr/sbin/nologin meshnode
#       install -d -o meshnode -g meshnode -m 0700 /var/lib/meshnode
#   - raw_exec enabled in the client configuration:  plugin "raw_exec" { config { enabled = true } }
#   - to let jobs register services (web.nomad.hcl), Nomad's Consul integration
#     pointed at the local agent:                   consul { address = "127.0.0.1:8500" }
#
# Do not also run the systemd unit on these hosts: one agent per host (both would
# want /var/lib/meshnode, which the agent locks, and the same ports).

variable "datacenters" {
  type        = list(string)
  default     = ["*"]
  description = "Datacenters whose clients all get an agent."
}

variable "retry_join" {
  type        = list(string)
  default     = []
  description = "Agents to join (host, host:port or [IPv6]:port), e.g. the meshnode servers."
}

job "meshnode" {
  # system: exactly one allocation on every eligible client, including clients that
  # join later; the scheduler never moves it elsewhere. That is the agent's contract:
  # one per host, found by local services at 127.0.0.1:8500.
  type        = "system"
  datacenters = var.datacenters
  # Other jobs register with the agent, so it goes first and is evicted last.
  priority = 90

  constraint {
    attribute = "${attr.kernel.name}"
    value     = "linux"
  }

  # One client at a time, 30 s apart: every agent restarting at once would make the
  # whole cluster suspect itself, and the CA servers must keep a majority.
  update {
    max_parallel = 1
    stagger      = "30s"
  }

  group "agent" {
    # Host networking (raw_exec has no other kind): gossip must be reachable on the
    # host's own address, and services on this host reach the API at 127.0.0.1:8500.
    # The static ports are reserved so the scheduler gives them to no other job.
    network {
      mode = "host"
      port "gossip" {
        static = 7946
      }
      port "http" {
        static = 8500
      }
      port "proxy" {
        static = 20000
      }
    }

    # A system job cannot be rescheduled elsewhere, so never give up on this host:
    # "delay" keeps retrying (every 15 s after 10 failures in 30 min) instead of
    # leaving the client without an agent, as "fail" would.
    restart {
      attempts = 10
      interval = "30m"
      delay    = "15s"
      mode     = "delay"
    }

    # No `service` block, on purpose: the agent IS the registry. Registering it in
    # Consul or Nomad would be circular (it would register with itself), and its
    # liveness is already tracked by gossip, where peers see it alive, failed or left.

    task "meshnode" {
      # raw_exec rather than exec: exec runs the task in a chroot that contains neither
      # the venv in /opt/meshnode nor /var/lib/meshnode, whose node ID, registrations
      # and keys must outlive any one allocation (a replaced allocation must come back
      # as the same node). The agent is host infrastructure, like the Nomad client
      # itself; it gets its isolation from running as an unprivileged user.
      driver = "raw_exec"
      # Needs a Nomad client running as root. On a client hardened so that raw_exec
      # cannot switch users, remove this line: the agent then runs as Nomad's user,
      # which must own /var/lib/meshnode.
      user = "meshnode"

      config {
        command = "/usr/local/bin/meshnode"
        args = [
          "agent",
          "--config", "${NOMAD_TASK_DIR}/agent.toml",
          "--data-dir", "/var/lib/meshnode",
          # Named and addressed as Nomad knows the client, so `meshnode members` and
          # `nomad node status` agree.
          "--node", "${node.unique.name}",
          "--advertise", "${attr.unique.network.ip-address}",
        ]
      }

      # SIGTERM: the agent leaves gracefully (peers see *left* at once, not a failure
      # after the suspicion timeout). The leave waits at most 5 s; 20 s leaves margin
      # and stays under the client's max_kill_timeout (30 s by default).
      kill_signal  = "SIGTERM"
      kill_timeout = "20s"

      # The configuration file. On a change (a new retry_join list) Nomad sends SIGHUP
      # and the agent reloads in place; settings a reload cannot change (ports,
      # addresses) need `nomad alloc restart`.
      template {
        destination   = "local/agent.toml"
        change_mode   = "signal"
        change_signal = "SIGHUP"
        data          = <<-EOT
          cluster     = "meshnode"
          datacenter  = "dc1"
          bind_addr   = "0.0.0.0"
          gossip_port = 7946
          http_addr   = "127.0.0.1:8500"
          # A JSON list of strings is a valid TOML array.
          retry_join  = ${jsonencode(var.retry_join)}
          log_format  = "json"

          [mdns]
          enabled = false   # clouds have no multicast: retry_join instead

          [acl]
          enabled = true    # token from MESHNODE_ACL__TOKEN (below)

          [proxy]
          port = 20000
        EOT
      }

      # Secrets from Nomad Variables, readable by this job only (its workload identity
      # grants nomad/jobs/meshnode), into the task's environment: never into the job
      # file, the config file or the command line (`ps` shows flags). A new key means a
      # restart: the agent reads MESHNODE_ENCRYPT only at start.
      template {
        destination = "secrets/meshnode.env"
        env         = true
        change_mode = "restart"
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/meshnode" -}}
          MESHNODE_ENCRYPT={{ .encrypt }}
          MESHNODE_ACL__TOKEN={{ .acl_token }}
          {{- end }}
        EOT
      }

      resources {
        cpu    = 200 # MHz
        memory = 256 # MiB
      }
    }
  }
}
