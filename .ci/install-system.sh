#!/usr/bin/env bash
# System packages the test suite needs beyond Python (Debian 12):
#   chromium + chromium-driver  headless browser for tests/test_browser.py (driven by the
#                               `playwright` Python package; `playwright install` is NOT used)
#   openssl                     deploy/make_certs.sh (TLS certificates for the deployment test)
#   openssh-client              ssh-keygen: ECDSA keys of the SuperNodes (node authentication)
#   nginx-light                 the coordinator's gateway: the sites reach the Fleet API only (deploy/fleet_gateway.py);
#                               the test starts its own nginx with its own configuration, the system one stays off
set -euo pipefail
if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium chromium-driver openssl openssh-client nginx-light
chromium --version
