package socks5

import "syscall"

const (
	errnoRefused     = syscall.ECONNREFUSED
	errnoHostUnreach = syscall.EHOSTUNREACH
	errnoNetUnreach  = syscall.ENETUNREACH
	errnoTimedOut    = syscall.ETIMEDOUT
)
