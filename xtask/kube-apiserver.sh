#!/bin/bash
# Builds kube-apiserver from Debian bookworm's `kubernetes` source package (the full upstream tree
# with vendor/) with Debian's Go 1.19, for the tests that run a real API server.
#
#   kube-apiserver.sh VERSION DEST
#
# Run by `cargo xtask setup` (xtask/src/kube.rs) when DEST/kube-apiserver is missing; the build
# deps (golang-1.19-go, golang-github-modern-go-reflect2-dev) are installed by xtask first.
# Everything happens in a scratch directory next to DEST that is removed on any exit; DEST
# appears only by a rename once the binary reports VERSION, so a failed build leaves no half cache.
set -euo pipefail
VERSION=${1:?usage: kube-apiserver.sh VERSION DEST}
DEST=${2:?usage: kube-apiserver.sh VERSION DEST}
GIT_COMMIT=faecb196815e248d3ecfb03c680a4507229c2a56 # upstream v1.20.2

PARENT=$(dirname "$DEST")
mkdir -p "$PARENT"
# One build at a time per cache (parallel setups wait here); the winner's result is reused.
exec 9>"$PARENT/.lock"
flock 9
if [ "$("$DEST/kube-apiserver" --version 2>/dev/null)" = "Kubernetes v$VERSION" ]; then
  echo "kube-apiserver build: $DEST already built"
  exit 0
fi
# Scratch directories of builds that were killed (SIGKILL skips the trap below).
rm -rf "$PARENT"/.build-*
WORK=$(mktemp -d "$PARENT/.build-$VERSION.XXXXXX")
trap 'chmod -R u+w "$WORK" 2>/dev/null; rm -rf "$WORK"' EXIT
cd "$WORK"
log() { printf 'kube-apiserver build: %s (%ss)\n' "$1" "$SECONDS"; }

# 1. The source package, through apt so its checksums are verified against Debian's signed
#    Sources index. A private list holds only deb-src, leaving the machine's apt config alone.
mkdir -p apt/lists/partial src
echo 'deb-src http://deb.debian.org/debian bookworm main' > apt/sources.list
APT=(apt-get -q -o APT::Sandbox::User=root -o Dir::Etc::sourcelist="$WORK/apt/sources.list" -o Dir::Etc::sourceparts=- -o Dir::State::Lists="$WORK/apt/lists")
"${APT[@]}" update >/dev/null
# Whatever bookworm has now (1.20.5+really1.20.2-1.1+deb12u1 when written; security updates change
# the suffix, and a superseded version leaves the mirror): the check below is on the upstream tree.
(cd src && "${APT[@]}" source --download-only kubernetes >/dev/null)
tar xzf src/kubernetes_*.orig.tar.gz -C src
rm -f src/kubernetes_*.orig.tar.gz
SRC=$(echo "$WORK"/src/kubernetes-"$VERSION")
[ -d "$SRC" ] || { echo "kube-apiserver build: Debian's kubernetes source is not upstream $VERSION (no $SRC)" >&2; exit 1; }
log "source extracted"

# 2. Build in GOPATH mode, as upstream 1.20's own build does (its go.mod predates module vendoring rules).
export PATH=/usr/lib/go-1.19/bin:$PATH GOPATH=$WORK/gopath GOCACHE=$WORK/gocache GOTMPDIR=$WORK/gotmp
export CGO_ENABLED=0 GO111MODULE=off GOFLAGS= GOTOOLCHAIN=local
mkdir -p "$GOPATH/src/k8s.io" "$GOTMPDIR"
ln -s "$SRC" "$GOPATH/src/k8s.io/kubernetes"
cd "$GOPATH/src/k8s.io/kubernetes"
# The vendored modern-go/reflect2 1.0.1 breaks map iteration under Go >= 1.18; Debian's 1.0.2 fixes it.
R=vendor/github.com/modern-go/reflect2
rm -f "$R"/*.go "$R"/*.s
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go /usr/share/gocode/src/github.com/modern-go/reflect2/*.s "$R"/
# The release tarball lacks pkg/generated/openapi/zz_generated.openapi.go, which upstream's
# `make generated_files` writes: generate it with the vendored openapi-gen from the same inputs
# (every package tagged +k8s:openapi-gen), and check the API rule report matches upstream's list.
go build -o "$WORK/openapi-gen" k8s.io/kubernetes/vendor/k8s.io/kube-openapi/cmd/openapi-gen
# (find -L: vendor/k8s.io/* are symlinks into staging/; no pipefail: xargs grep exits 123 when
# one batch has no match.)
set +o pipefail
INPUTS=$(find -L pkg cmd plugin vendor -type f -name '*.go' -not -path '*/testdata/*' -print0 \
  | xargs -0 grep -lZ '^// *+k8s:' | xargs -0 grep -l '+k8s:openapi-gen=' | xargs -n1 dirname | LC_ALL=C sort -u \
  | grep -v -E '^vendor/k8s.io/(code-generator|sample-apiserver)/' | sed 's#^#k8s.io/kubernetes/#' | paste -sd, -)
set -o pipefail
"$WORK/openapi-gen" --logtostderr -i "$INPUTS" -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
  -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt -r "$WORK/openapi-violations.report" 2>"$WORK/openapi-gen.log" \
  || { tail -20 "$WORK/openapi-gen.log" >&2; exit 1; }
diff -q "$WORK/openapi-violations.report" api/api-rules/violation_exceptions.list >/dev/null \
  || { echo "kube-apiserver build: openapi-gen's API rule report differs from upstream's" >&2; exit 1; }
log "openapi generated"
LD="-s -w"
for p in k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version k8s.io/kubernetes/vendor/k8s.io/component-base/version; do
  LD="$LD -X $p.gitVersion=v$VERSION -X $p.gitMajor=${VERSION%%.*} -X $p.gitMinor=$(echo "$VERSION" | cut -d. -f2)"
  LD="$LD -X $p.gitCommit=$GIT_COMMIT -X $p.gitTreeState=archive"
done
# nice: the build takes both cores for minutes; let interactive work and other builds go first.
nice -n 19 go build -trimpath -ldflags "$LD" -o "$WORK/out/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
log "built"

# 3. Check, then publish by rename.
GOT=$("$WORK/out/kube-apiserver" --version)
[ "$GOT" = "Kubernetes v$VERSION" ] || { echo "kube-apiserver build: --version says '$GOT'" >&2; exit 1; }
rm -rf "$DEST"
mv "$WORK/out" "$DEST"
log "installed $DEST/kube-apiserver"
