// Package all links every proxy kind into a program: importing it runs
// each proxy package's registration (proxy.Register). Adding a proxy is
// its package plus one line here.
package all

import (
	_ "spliced/proxy/ftp"
	_ "spliced/proxy/httpproxy"
	_ "spliced/proxy/socks5"
)
