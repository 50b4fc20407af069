//! A real Kubernetes API server for tests: etcd plus kube-apiserver on loopback.
//!
//! [`KubeApi::start`] runs Debian's etcd 3.4 and the kube-apiserver that `cargo xtask setup`
//! builds (cached under `~/.cache/strait/kube-apiserver/<version>/`), each on ports picked free on
//! 127.0.0.1 and with data in a fresh directory, so tests run in parallel
//! ([`KubeApi::start_in_netns`] puts them in a topology's fabric instead, where its nodes reach
//! them). The API server has a static admin token, RBAC, and a service-account signing key
//! (TokenRequest and TokenReview work; audiences are the API server's own and `istio-ca`). There is no controller-manager,
//! scheduler or kubelet: tests play those parts (`bind_pod`, `set_pod_status`).
//!
//! Dropping the handle stops both processes (SIGTERM, then SIGKILL) and removes the directory.
//! A test binary that crashes leaves both running; the next `start` kills them (their pids are
//! recorded in the directory) and removes the directory.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::command::{check, command_line, context};

/// The version `cargo xtask setup` builds (xtask/src/kube.rs).
pub const KUBE_APISERVER_VERSION: &str = "1.20.2";
/// The service-account token issuer, as in a real cluster.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// Audiences the API server accepts in service-account tokens: its own, and Istio's CA's (the CA
/// API verifies the node's and pods' tokens with that audience, ID-2).
pub const API_AUDIENCES: &[&str] = &[SERVICE_ACCOUNT_ISSUER, "istio-ca"];
/// The Service cluster-IP range the API server allocates from.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";

/// etcd and the API server are usually ready in a few seconds; a loaded machine running tests in
/// parallel can take much longer.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const TERM_GRACE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(50);
/// Starts retried when a freshly picked port was taken by someone else meanwhile.
const START_ATTEMPTS: u32 = 3;
/// Directory names under the temp dir: `strait-kube-<pid>-<n>`.
const DIR_PREFIX: &str = "strait-kube-";

/// CRDs every instance gets (fixtures in `tests/fixtures/kube/`): Istio's networking and security
/// kinds, and Gateway API's GatewayClass and Gateway.
const CRD_FIXTURES: &[&str] = &["istio-crds.json", "gateway-api-crds.yaml"];

static INSTANCES: AtomicU32 = AtomicU32::new(0);

/// The repository's root directory.
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Logs every request once, when it arrives (a watch is counted when it starts).
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [ResponseStarted, ResponseComplete, Panic]
rules:
- level: Metadata
";

/// A running etcd + kube-apiserver; stopped and cleaned up on drop.
#[derive(Debug)]
pub struct KubeApi {
    dir: PathBuf,
    /// The network namespace etcd, the API server and kubectl run in (`None`: the test's own).
    netns: Option<String>,
    /// The API server's address: 127.0.0.1, or the address given to `start_in_netns`.
    address: Ipv4Addr,
    kubeconfig: PathBuf,
    token: String,
    apiserver_port: u16,
    etcd_url: String,
    apiserver_bin: PathBuf,
    apiserver_args: Vec<String>,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    /// How long the last API server start took until `/readyz` said ok.
    apiserver_start: Duration,
}

impl KubeApi {
    /// Starts etcd and the API server and installs the CRDs of `tests/fixtures/kube/`.
    pub fn start() -> io::Result<KubeApi> {
        let api = KubeApi::start_without_crds()?;
        api.install_crds()?;
        Ok(api)
    }

    /// Starts etcd and the API server with only the built-in APIs.
    pub fn start_without_crds() -> io::Result<KubeApi> {
        KubeApi::start_where(None, Ipv4Addr::LOCALHOST)
    }

    /// Starts etcd and the API server inside the network namespace `netns`, the API server on
    /// `address` (an address of that namespace, e.g. a topology's fabric gateway, so that
    /// processes in the nodes reach it), and installs the CRDs. kubectl runs there too. Ports
    /// are the standard ones (2379, 2380, 6443): one instance per namespace.
    pub fn start_in_netns(netns: &str, address: Ipv4Addr) -> io::Result<KubeApi> {
        let api = KubeApi::start_where(Some(netns.to_string()), address)?;
        api.install_crds()?;
        Ok(api)
    }

    fn start_where(netns: Option<String>, address: Ipv4Addr) -> io::Result<KubeApi> {
        let apiserver = kube_apiserver_path()?;
        let etcd = which("etcd").ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "etcd is not installed: run `cargo xtask setup` (package etcd-server)",
            )
        })?;
        sweep_stale_dirs();
        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            match KubeApi::try_start(&apiserver, &etcd, netns.clone(), address) {
                Ok(api) => return Ok(api),
                // Only a lost race for a port is worth another try; anything else is reported.
                Err(StartError::PortTaken(err)) => last_err = Some(err),
                Err(StartError::Other(err)) => return Err(err),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("no start attempt made")))
    }

    fn try_start(
        apiserver: &Path,
        etcd: &Path,
        netns: Option<String>,
        address: Ipv4Addr,
    ) -> Result<KubeApi, StartError> {
        let n = INSTANCES.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("pki")).map_err(context(format!("creating {}", dir.display())))?;
        // From here on, `api` owns the directory and the processes: an error drops it, which
        // stops whatever was started and removes the directory.
        let mut api = KubeApi {
            netns,
            address,
            kubeconfig: dir.join("kubeconfig"),
            token: random_token(),
            apiserver_port: 0,
            etcd_url: String::new(),
            apiserver_bin: apiserver.to_path_buf(),
            apiserver_args: Vec::new(),
            etcd: None,
            apiserver: None,
            apiserver_start: Duration::ZERO,
            dir,
        };
        write_pki(&api.dir.join("pki"), address)?;
        fs::write(api.dir.join("pki/tokens.csv"), format!("{},admin,admin-uid,system:masters\n", api.token))?;

        // A fresh namespace has every port free, and `free_port` could only look at ours.
        let (client_port, peer_port, apiserver_port) =
            if api.netns.is_some() { (2379, 2380, 6443) } else { (free_port()?, free_port()?, free_port()?) };
        api.etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd_log = api.dir.join("etcd.log");
        let mut cmd = api.command(etcd);
        cmd.arg("--name=strait-test")
            .arg(format!("--data-dir={}", api.dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={}", api.etcd_url))
            .arg(format!("--advertise-client-urls={}", api.etcd_url))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=strait-test={peer_url}"))
            .arg("--initial-cluster-state=new")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr");
        let etcd_child = spawn_logged(&mut cmd, &etcd_log)?;
        write_pid(&api.dir, "etcd", etcd_child.id());
        api.etcd = Some(etcd_child);
        let started = Instant::now();
        loop {
            if api.etcd_healthy() {
                break;
            }
            if let Some(status) = try_wait(&mut api.etcd) {
                let log = read_lossy(&etcd_log);
                let err =
                    io::Error::other(format!("etcd exited ({status}) before it was healthy; log:\n{}", tail(&log)));
                return Err(if log.contains("address already in use") {
                    StartError::PortTaken(err)
                } else {
                    err.into()
                });
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(io::Error::other(format!(
                    "etcd not healthy after {READY_TIMEOUT:?}; log:\n{}",
                    tail(&read_lossy(&etcd_log))
                ))
                .into());
            }
            thread::sleep(POLL);
        }

        api.apiserver_port = apiserver_port;
        let pki = api.dir.join("pki");
        let p = |f: &str| pki.join(f).display().to_string();
        api.apiserver_args = vec![
            format!("--etcd-servers={}", api.etcd_url),
            format!("--bind-address={address}"),
            format!("--advertise-address={address}"),
            format!("--secure-port={apiserver_port}"),
            "--insecure-port=0".into(),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            format!("--token-auth-file={}", p("tokens.csv")),
            "--authorization-mode=Node,RBAC".into(),
            format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            format!("--api-audiences={}", API_AUDIENCES.join(",")),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            // No controller-manager or kubelet runs: the `kubernetes` Service's endpoints would
            // point at an address nothing else can reach, and the ServiceAccount admission would
            // wait for token Secrets no controller creates.
            "--endpoint-reconciler-type=none".into(),
            "--disable-admission-plugins=ServiceAccount".into(),
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
            "--logtostderr=true".into(),
            "--v=1".into(),
            // One audit line per request as it arrives, so tests and benchmarks can count what
            // a client asked (`audit_events`).
            format!("--audit-policy-file={}", api.dir.join("audit-policy.yaml").display()),
            format!("--audit-log-path={}", api.dir.join("audit.log").display()),
        ];
        fs::write(api.dir.join("audit-policy.yaml"), AUDIT_POLICY)?;
        api.spawn_apiserver().map_err(|e| {
            if e.to_string().contains("address already in use") {
                StartError::PortTaken(e)
            } else {
                StartError::Other(e)
            }
        })?;
        api.write_kubeconfig()?;
        Ok(api)
    }

    fn spawn_apiserver(&mut self) -> io::Result<()> {
        let log = self.dir.join("kube-apiserver.log");
        let mut cmd = self.command(&self.apiserver_bin);
        cmd.args(&self.apiserver_args);
        let started = Instant::now();
        let child = spawn_logged(&mut cmd, &log)?;
        write_pid(&self.dir, "kube-apiserver", child.id());
        self.apiserver = Some(child);
        loop {
            if self.readyz() {
                self.apiserver_start = started.elapsed();
                return Ok(());
            }
            if let Some(status) = try_wait(&mut self.apiserver) {
                return Err(io::Error::other(format!(
                    "kube-apiserver exited ({status}) before /readyz was ok; log:\n{}",
                    tail(&read_lossy(&log))
                )));
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(io::Error::other(format!(
                    "kube-apiserver not ready after {READY_TIMEOUT:?}; log:\n{}",
                    tail(&read_lossy(&log))
                )));
            }
            thread::sleep(POLL);
        }
    }

    /// The audit log so far: one JSON event per request the API server received (stage
    /// `RequestReceived`, level Metadata: verb, requestURI, user, userAgent, time).
    pub fn audit_events(&self) -> io::Result<Vec<serde_json::Value>> {
        let text = read_lossy(&self.dir.join("audit.log"));
        Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
    }

    /// `GET /readyz` with the admin token answers `ok`.
    fn readyz(&self) -> bool {
        let out = self
            .command("curl")
            .args(["-sS", "-m", "2", "--cacert"])
            .arg(self.ca_cert())
            .arg("-H")
            .arg(format!("Authorization: Bearer {}", self.token))
            .arg(format!("{}/readyz", self.server_url()))
            .output();
        out.is_ok_and(|o| o.status.success() && o.stdout.trim_ascii() == b"ok")
    }

    fn write_kubeconfig(&self) -> io::Result<()> {
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: strait-test\n  cluster:\n    server: {}\n    \
             certificate-authority: {}\nusers:\n- name: admin\n  user:\n    token: {}\ncontexts:\n- name: strait-test\n  \
             context:\n    cluster: strait-test\n    user: admin\ncurrent-context: strait-test\n",
            self.server_url(),
            self.ca_cert().display(),
            self.token
        );
        fs::write(&self.kubeconfig, config).map_err(context(format!("writing {}", self.kubeconfig.display())))
    }

    /// Stops the API server and starts it again on the same port, keeping etcd and its data, as
    /// an API server upgrade or crash does under running clients.
    pub fn restart_apiserver(&mut self) -> io::Result<()> {
        stop(&mut self.apiserver);
        self.spawn_apiserver()
    }

    /// Stops only the API server (clients see connection refused until `start_apiserver_again`).
    pub fn stop_apiserver(&mut self) {
        stop(&mut self.apiserver);
    }

    /// Starts the API server stopped by `stop_apiserver`.
    pub fn start_apiserver_again(&mut self) -> io::Result<()> {
        if self.apiserver.is_some() {
            return Err(io::Error::other("the API server is running"));
        }
        self.spawn_apiserver()
    }

    /// Installs the CRDs of `tests/fixtures/kube/` and waits until they are served.
    pub fn install_crds(&self) -> io::Result<()> {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/kube");
        let mut args = vec!["apply".to_string()];
        for f in CRD_FIXTURES {
            args.push("-f".into());
            args.push(fixtures.join(f).display().to_string());
        }
        self.kubectl(&args)?;
        self.wait_crds_established("app.kubernetes.io/part-of=strait-tests")
    }

    /// `kubectl apply --server-side -k deploy/k8s-1.20` (this API server is 1.20), then waits
    /// until its CRDs are served.
    pub fn install_deploy(&self) -> io::Result<()> {
        let overlay = workspace_dir().join("deploy/k8s-1.20");
        self.kubectl(&["apply", "--server-side", "-k", &overlay.to_string_lossy()])?;
        self.wait_crds_established("app.kubernetes.io/part-of=strait")
    }

    fn wait_crds_established(&self, selector: &str) -> io::Result<()> {
        self.kubectl(&["wait", "--for=condition=Established", "--timeout=60s", "crd", "-l", selector]).map(drop)
    }

    /// etcd's `/health` says it is healthy.
    fn etcd_healthy(&self) -> bool {
        let out = self.command("curl").args(["-sS", "-m", "1"]).arg(format!("{}/health", self.etcd_url)).output();
        out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("\"health\":\"true\""))
    }

    /// `program` to run in this instance's network namespace.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }

    /// The server's URL, `https://<address>:<port>`.
    pub fn server_url(&self) -> String {
        format!("https://{}:{}", self.address, self.apiserver_port)
    }

    pub fn port(&self) -> u16 {
        self.apiserver_port
    }

    /// The kubeconfig (admin token, the server's CA), for `KUBECONFIG=`.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The CA certificate the API server's serving certificate chains to.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("pki/ca.crt")
    }

    /// The static admin token (group `system:masters`).
    pub fn admin_token(&self) -> &str {
        &self.token
    }

    /// The etcd client URL, for tests that look under the API server.
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }

    /// The instance's directory (PKI, kubeconfig, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How long the last API server start took, from spawn to `/readyz` ok.
    pub fn apiserver_start_time(&self) -> Duration {
        self.apiserver_start
    }

    /// The API server's log so far.
    pub fn apiserver_log(&self) -> String {
        read_lossy(&self.dir.join("kube-apiserver.log"))
    }

    /// PIDs of etcd and the API server (if running).
    pub fn pids(&self) -> (Option<u32>, Option<u32>) {
        (self.etcd.as_ref().map(Child::id), self.apiserver.as_ref().map(Child::id))
    }

    /// A `kubectl` command with this instance's kubeconfig, to run or spawn as the test likes.
    pub fn kubectl_command<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Command {
        let mut cmd = self.command("kubectl");
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        // kubectl's disk cache of discovery would be shared between instances on different ports;
        // keep it per instance.
        cmd.env("KUBECACHEDIR", self.dir.join("kubectl-cache"));
        cmd
    }

    /// Runs kubectl; its stdout, or an error with the command line, status and stderr.
    pub fn kubectl<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> io::Result<String> {
        self.kubectl_stdin(args, None)
    }

    /// Runs kubectl expecting it to fail; its stderr, or an error quoting stdout if it succeeded.
    pub fn kubectl_fails<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> io::Result<String> {
        let cmd = self.kubectl_command(args);
        let line = command_line(cmd.get_program(), &cmd.get_args().collect::<Vec<_>>());
        let out = self.kubectl_command(args).output().map_err(context(&line))?;
        if out.status.success() {
            return Err(io::Error::other(format!("`{line}` succeeded: {}", String::from_utf8_lossy(&out.stdout))));
        }
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// `kubectl apply -f -` of `yaml` expecting the server to refuse it; kubectl's stderr.
    pub fn apply_fails(&self, yaml: &str) -> io::Result<String> {
        let mut cmd = self.kubectl_command(&["apply", "-f", "-"]);
        let line = command_line(cmd.get_program(), &cmd.get_args().collect::<Vec<_>>());
        let out = run_with_stdin(&mut cmd, Some(yaml)).map_err(context(&line))?;
        if out.status.success() {
            return Err(io::Error::other(format!("`{line}` accepted: {yaml}")));
        }
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    fn kubectl_stdin<S: AsRef<std::ffi::OsStr>>(&self, args: &[S], stdin: Option<&str>) -> io::Result<String> {
        let mut cmd = self.kubectl_command(args);
        let line = command_line(cmd.get_program(), &cmd.get_args().collect::<Vec<_>>());
        let out = run_with_stdin(&mut cmd, stdin).map_err(context(&line))?;
        check(&line, out)
    }

    /// `kubectl apply -f -` of `yaml` (one or more documents).
    pub fn apply(&self, yaml: &str) -> io::Result<String> {
        self.kubectl_stdin(&["apply", "-f", "-"], Some(yaml))
    }

    /// `kubectl create -f - -o json` of `yaml`: for objects that are requests (TokenReview,
    /// SubjectAccessReview), whose answer is the created object.
    pub fn create_json(&self, yaml: &str) -> io::Result<String> {
        self.kubectl_stdin(&["create", "-f", "-", "-o", "json"], Some(yaml))
    }

    /// What the scheduler does: binds `pod` to `node` (sets `spec.nodeName` through the
    /// `binding` subresource). A pod created with `spec.nodeName` needs no binding.
    pub fn bind_pod(&self, namespace: &str, pod: &str, node: &str) -> io::Result<()> {
        let binding = format!(
            "{{\"apiVersion\":\"v1\",\"kind\":\"Binding\",\"metadata\":{{\"name\":\"{pod}\"}},\
             \"target\":{{\"apiVersion\":\"v1\",\"kind\":\"Node\",\"name\":\"{node}\"}}}}"
        );
        let path = format!("/api/v1/namespaces/{namespace}/pods/{pod}/binding");
        self.kubectl_stdin(&["create", "--raw", &path, "-f", "-"], Some(&binding)).map(drop)
    }

    /// What a kubelet does once the pod's sandbox is up: phase Running, Ready, the pod IP and the
    /// node's IP (`hostIP`), written to the `status` subresource.
    pub fn set_pod_status(&self, namespace: &str, pod: &str, pod_ip: &str, host_ip: &str) -> io::Result<()> {
        let now = rfc3339_now();
        let patch = format!(
            "{{\"status\":{{\"phase\":\"Running\",\"hostIP\":\"{host_ip}\",\"podIP\":\"{pod_ip}\",\
             \"podIPs\":[{{\"ip\":\"{pod_ip}\"}}],\"startTime\":\"{now}\",\"conditions\":[\
             {{\"type\":\"Initialized\",\"status\":\"True\",\"lastTransitionTime\":\"{now}\"}},\
             {{\"type\":\"ContainersReady\",\"status\":\"True\",\"lastTransitionTime\":\"{now}\"}},\
             {{\"type\":\"Ready\",\"status\":\"True\",\"lastTransitionTime\":\"{now}\"}},\
             {{\"type\":\"PodScheduled\",\"status\":\"True\",\"lastTransitionTime\":\"{now}\"}}]}}}}"
        );
        self.kubectl(&["patch", "pod", "-n", namespace, pod, "--subresource=status", "--type=merge", "-p", &patch])
            .map(drop)
    }

    /// Registers a Node named `name` with `InternalIP` `ip` and condition Ready, as a kubelet
    /// does when it joins.
    pub fn add_node(&self, name: &str, ip: &str) -> io::Result<()> {
        self.apply(&format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    kubernetes.io/hostname: {name}\n"
        ))?;
        let now = rfc3339_now();
        let patch = format!(
            "{{\"status\":{{\"addresses\":[{{\"type\":\"InternalIP\",\"address\":\"{ip}\"}},\
             {{\"type\":\"Hostname\",\"address\":\"{name}\"}}],\"conditions\":[{{\"type\":\"Ready\",\
             \"status\":\"True\",\"reason\":\"KubeletReady\",\"lastHeartbeatTime\":\"{now}\",\
             \"lastTransitionTime\":\"{now}\"}}]}}}}"
        );
        self.kubectl(&["patch", "node", name, "--subresource=status", "--type=merge", "-p", &patch]).map(drop)
    }

    /// A service-account token from the TokenRequest API (`kubectl create token`), for
    /// `audience`, valid `seconds`; bound to `pod` if given (as a projected volume's token is).
    /// The ServiceAccount (and the pod) must exist.
    pub fn service_account_token(
        &self,
        namespace: &str,
        service_account: &str,
        audience: &str,
        pod: Option<&str>,
        seconds: u32,
    ) -> io::Result<String> {
        let duration = format!("--duration={seconds}s");
        let mut args = vec!["create", "token", "-n", namespace, service_account, "--audience", audience, &duration];
        if let Some(pod) = pod {
            args.extend(["--bound-object-kind", "Pod", "--bound-object-name", pod]);
        }
        self.kubectl(&args).map(|t| t.trim().to_string())
    }

    /// Starts `kubectl <args>` (e.g. `get pods -w -o json`, or `get --raw '/api/v1/pods?watch=1'`)
    /// in the background; its output is read with [`KubeWatch::wait_for`].
    pub fn watch<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> io::Result<KubeWatch> {
        let n = INSTANCES.fetch_add(1, Ordering::Relaxed);
        let out = self.dir.join(format!("watch-{n}.out"));
        let mut cmd = self.kubectl_command(args);
        let line = command_line(cmd.get_program(), &cmd.get_args().collect::<Vec<_>>());
        let child = spawn_logged(&mut cmd, &out).map_err(context(&line))?;
        Ok(KubeWatch { line, out, child: Some(child) })
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        stop(&mut self.apiserver);
        stop(&mut self.etcd);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A background `kubectl` (usually a watch); killed on drop.
#[derive(Debug)]
pub struct KubeWatch {
    line: String,
    out: PathBuf,
    child: Option<Child>,
}

impl KubeWatch {
    /// Everything kubectl printed so far (stdout and stderr).
    pub fn output(&self) -> String {
        read_lossy(&self.out)
    }

    /// Waits until the output contains every one of `needles`; returns the output.
    pub fn wait_for(&mut self, needles: &[&str], timeout: Duration) -> io::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let exited = try_wait(&mut self.child);
            let out = self.output();
            if needles.iter().all(|n| out.contains(n)) {
                return Ok(out);
            }
            let missing: Vec<_> = needles.iter().filter(|n| !out.contains(*n)).collect();
            if let Some(status) = exited {
                return Err(io::Error::other(format!(
                    "`{}` exited ({status}) without printing {missing:?}; output:\n{}",
                    self.line,
                    tail(&out)
                )));
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "`{}` printed no {missing:?} within {timeout:?}; output:\n{}",
                    self.line,
                    tail(&out)
                )));
            }
            thread::sleep(POLL);
        }
    }
}

impl Drop for KubeWatch {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

enum StartError {
    PortTaken(io::Error),
    Other(io::Error),
}

impl From<io::Error> for StartError {
    fn from(err: io::Error) -> StartError {
        StartError::Other(err)
    }
}

/// The kube-apiserver binary: `$STRAIT_KUBE_APISERVER`, else the cache `cargo xtask setup` fills.
pub fn kube_apiserver_path() -> io::Result<PathBuf> {
    if let Some(path) = std::env::var_os("STRAIT_KUBE_APISERVER") {
        return Ok(PathBuf::from(path));
    }
    let root = if let Some(dir) = std::env::var_os("STRAIT_CACHE_DIR") {
        PathBuf::from(dir)
    } else if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        PathBuf::from(dir).join("strait")
    } else {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/strait")
    };
    let path = root.join("kube-apiserver").join(KUBE_APISERVER_VERSION).join("kube-apiserver");
    if path.is_file() {
        Ok(path)
    } else {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} is missing: run `cargo xtask setup` (builds it once per machine)", path.display()),
        ))
    }
}

/// Checks test clusters use on the project's manifests and RBAC.
impl KubeApi {
    /// `kubectl auth can-i VERB RESOURCE -n NAMESPACE --as USER`; `RESOURCE` is
    /// `resource[/name]`, or `resource#subresource`.
    pub fn can_i(&self, user: &str, verb: &str, resource: &str, namespace: &str) -> io::Result<bool> {
        let mut args = vec!["auth", "can-i", verb, "-n", namespace, "--as", user];
        match resource.split_once('#') {
            Some((resource, subresource)) => args.extend([resource, "--subresource", subresource]),
            None => args.push(resource),
        }
        let out = self.kubectl_command(&args).output()?;
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
        match answer.as_str() {
            "yes" => Ok(true),
            "no" => Ok(false),
            _ => Err(io::Error::other(format!(
                "kubectl auth can-i {verb} {resource}: {answer} {}",
                String::from_utf8_lossy(&out.stderr)
            ))),
        }
    }

    /// An hour's API token of strait's control plane (`strait-system/strait-control`, audience
    /// the API server), as its Deployment gets one.
    pub fn control_plane_token(&self) -> io::Result<String> {
        self.service_account_token(
            "strait-system",
            "strait-control",
            "https://kubernetes.default.svc.cluster.local",
            None,
            3600,
        )
    }

    /// Polls `get` (a kubectl command printing JSON) until `done` holds for its object, for up
    /// to `timeout`; the object, or an error naming `what` and the last answer.
    pub fn wait_json(
        &self,
        get: &[&str],
        what: &str,
        timeout: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> io::Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.kubectl(get).and_then(|text| serde_json::from_str(&text).map_err(io::Error::other));
            if let Ok(object) = &last
                && done(object)
            {
                return Ok(object.clone());
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!("{what}: not after {timeout:?}; last: {last:?}")));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// kubectl as the holder of `token` (its `--token` replaces the admin's), `stdin` piped in
    /// when given: whether it succeeded, and its stdout and stderr.
    pub fn kubectl_as(&self, token: &str, args: &[&str], stdin: Option<&str>) -> io::Result<(bool, String)> {
        let mut all = vec!["--token", token];
        all.extend_from_slice(args);
        let mut child =
            self.kubectl_command(&all).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        let mut input = child.stdin.take().ok_or_else(|| io::Error::other("no stdin"))?;
        if let Some(text) = stdin {
            input.write_all(text.as_bytes())?;
        }
        drop(input);
        let out = child.wait_with_output()?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        Ok((out.status.success(), text))
    }

    /// A kubeconfig (in this server's directory, named after `name`) with this API server and
    /// `token` as the user.
    pub fn token_kubeconfig(&self, token: &str, name: &str) -> io::Result<PathBuf> {
        let path = self.dir().join(format!("{name}.kubeconfig"));
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority: \
             {}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: \
             u\ncurrent-context: c\n",
            self.server_url(),
            self.ca_cert().display()
        );
        fs::write(&path, config)?;
        Ok(path)
    }
}

/// `strait control --kubernetes` run on the test's host against a [`KubeApi`] with the given
/// kubeconfig, as one leader-election replica named `identity`; killed when dropped.
pub struct KubeControl {
    child: Option<Child>,
    log: PathBuf,
    ca: PathBuf,
}

impl KubeControl {
    pub fn start(api: &KubeApi, kubeconfig: &Path, identity: &str) -> io::Result<KubeControl> {
        let strait = crate::require_bin("strait")?;
        let log = api.dir().join(format!("control-{identity}.log"));
        let out = fs::File::create(&log)?;
        let ca = api.dir().join(format!("ca-{identity}"));
        let child = Command::new(strait)
            .args(["control", "--kubernetes", "--ca-dir"])
            .arg(&ca)
            .arg(format!("--listen=127.0.0.1:{}", free_port()?))
            .arg(format!("--metrics-addr=127.0.0.1:{}", free_port()?))
            .args(["--leader-election-namespace=strait-system", "--leader-election-identity", identity])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        Ok(KubeControl { child: Some(child), log, ca })
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until its log contains `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> io::Result<()> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if self.log().contains(needle) {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        }
        Err(io::Error::other(format!("no `{needle}` in {:?}; log:\n{}", timeout, self.log())))
    }

    /// The mesh root certificate it wrote into its CA directory.
    pub fn root(&self) -> io::Result<String> {
        fs::read_to_string(self.ca.join("root-cert.pem"))
    }

    pub fn signal(&mut self, signal: i32) {
        if let Some(child) = &self.child {
            let Ok(pid) = i32::try_from(child.id()) else { return };
            // SAFETY: signalling our own child, not yet reaped.
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// Waits for it to exit (after [`KubeControl::signal`]).
    pub fn wait(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}

impl Drop for KubeControl {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `kubectl kustomize DIR`: the manifests an overlay renders.
pub fn kustomize(dir: &Path) -> io::Result<String> {
    let out = Command::new("kubectl").arg("kustomize").arg(dir).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "kubectl kustomize {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// kubernetes-validate (strict: unknown fields are errors) on `yaml` for Kubernetes `version`,
/// from the venv `cargo xtask setup` installs it into (xtask/src/kube.rs); the manifests are
/// written to `dir`. Whether they passed, and what it said.
pub fn kubernetes_validate(yaml: &str, version: &str, dir: &Path) -> io::Result<(bool, String)> {
    let cache = match std::env::var_os("STRAIT_CACHE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => match std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
            Some(dir) => PathBuf::from(dir).join("strait"),
            None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/strait"),
        },
    };
    let bin = cache.join("kubernetes-validate/bin/kubernetes-validate");
    if !bin.is_file() {
        return Err(io::Error::other(format!("{} is missing: run `cargo xtask setup`", bin.display())));
    }
    let file = dir.join(format!("rendered-{version}.yaml"));
    fs::write(&file, yaml)?;
    let out = Command::new(bin).args(["--strict", "--quiet", "-k", version]).arg(&file).output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success() && !text.contains("ERROR"), text))
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(program)).find(|p| p.is_file()))
}

/// A port free on 127.0.0.1 right now. Another process may take it before our server binds it;
/// `start` retries when that happens.
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

fn random_token() -> String {
    let mut bytes = [0u8; 16];
    if fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).is_err() {
        // Unique enough for a loopback test server if /dev/urandom is unreadable.
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        bytes = (nanos ^ u128::from(std::process::id())).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A CA, the API server's serving certificate (`address`, 127.0.0.1, localhost, the in-cluster
/// names) and the service-account signing key. P-256 keys: generating them is instant, RSA's is not.
fn write_pki(dir: &Path, address: Ipv4Addr) -> io::Result<()> {
    let f = |name: &str| dir.join(name).display().to_string();
    let openssl = |args: &[&str]| -> io::Result<()> {
        let out = Command::new("openssl").args(args).output().map_err(context("running openssl"))?;
        check(&format!("openssl {}", args.join(" ")), out).map(drop)
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca = vec!["req", "-x509", "-days", "30", "-subj", "/CN=strait-test-ca"];
    ca.extend(ec);
    let (ca_key, ca_crt) = (f("ca.key"), f("ca.crt"));
    ca.extend(["-keyout", &ca_key, "-out", &ca_crt]);
    openssl(&ca)?;
    let (key, csr, crt) = (f("apiserver.key"), f("apiserver.csr"), f("apiserver.crt"));
    let mut req = vec!["req", "-subj", "/CN=kube-apiserver"];
    req.extend(ec);
    req.extend(["-keyout", &key, "-out", &csr]);
    openssl(&req)?;
    let ext = f("apiserver.ext");
    fs::write(
        &ext,
        format!(
            "subjectAltName=IP:{address},IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,\
             DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\n"
        ),
    )?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca_crt,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-days",
        "30",
        "-out",
        &crt,
        "-extfile",
        &ext,
    ])?;
    let (sa_key, sa_pub) = (f("sa.key"), f("sa.pub"));
    openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &sa_key])?;
    openssl(&["ec", "-in", &sa_key, "-pubout", "-out", &sa_pub])
}

/// Spawns `cmd` with stdout and stderr appended to `log`. Not `PR_SET_PDEATHSIG`: it fires when
/// the spawning *thread* exits, and tests start instances from helper threads.
fn spawn_logged(cmd: &mut Command, log: &Path) -> io::Result<Child> {
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(context(format!("opening {}", log.display())))?;
    cmd.stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file);
    let line = command_line(cmd.get_program(), &cmd.get_args().collect::<Vec<_>>());
    cmd.spawn().map_err(context(line))
}

fn run_with_stdin(cmd: &mut Command, stdin: Option<&str>) -> io::Result<Output> {
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())?;
    }
    child.wait_with_output()
}

fn try_wait(child: &mut Option<Child>) -> Option<std::process::ExitStatus> {
    child.as_mut().and_then(|c| c.try_wait().ok().flatten())
}

/// SIGTERM, up to `TERM_GRACE` to exit, then SIGKILL; reaps the child.
fn stop(child: &mut Option<Child>) {
    let Some(mut c) = child.take() else { return };
    if c.try_wait().ok().flatten().is_none() {
        if let Ok(pid) = libc::pid_t::try_from(c.id()) {
            // SAFETY: kill has no memory effects; the child is not reaped, so the pid is ours.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + TERM_GRACE;
        while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            thread::sleep(POLL);
        }
        let _ = c.kill();
    }
    let _ = c.wait();
}

/// Records a child's pid so a later run can stop it if this test binary crashes.
fn write_pid(dir: &Path, name: &str, pid: u32) {
    let _ = fs::write(dir.join(format!("{name}.pid")), pid.to_string());
}

/// For each `strait-kube-<pid>-<n>` directory whose test process is gone (a crashed run): kills
/// the etcd and API server it recorded (if their command line still names the directory, so a
/// reused pid is left alone) and removes the directory.
fn sweep_stale_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)).and_then(|r| r.split('-').next())
        else {
            continue;
        };
        if !owner.parse::<u32>().is_ok_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            continue;
        }
        let dir = entry.path();
        for child in ["kube-apiserver", "etcd"] {
            let Some(pid) =
                fs::read_to_string(dir.join(format!("{child}.pid"))).ok().and_then(|p| p.trim().parse::<i32>().ok())
            else {
                continue;
            };
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&*dir.to_string_lossy()) {
                // SAFETY: kill has no memory effects; the pid was checked to be that child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = fs::remove_dir_all(&dir);
    }
}

fn read_lossy(path: &Path) -> String {
    fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Now as RFC 3339 UTC (`2026-01-02T03:04:05Z`), for status timestamps.
fn rfc3339_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_is_well_formed() {
        let now = rfc3339_now();
        assert_eq!(now.len(), 20, "{now}");
        assert!(now.starts_with("20") && now.ends_with('Z') && now.as_bytes()[10] == b'T', "{now}");
    }

    #[test]
    fn tokens_differ() {
        assert_ne!(random_token(), random_token());
    }
}
