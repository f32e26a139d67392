package api

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/user"
	"strconv"
	"syscall"
)

// Client talks to a daemon's control socket.
type Client struct {
	Socket string
	http   *http.Client
}

// NewClient returns a client for the socket at path.
func NewClient(path string) *Client {
	return &Client{Socket: path, http: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}}}
}

// NotRunningError means nothing answers on the socket.
type NotRunningError struct {
	Socket string
	Err    error
}

func (e *NotRunningError) Error() string {
	reason := e.Err.Error()
	var errno syscall.Errno
	if errors.As(e.Err, &errno) {
		reason = errno.Error()
	}
	return fmt.Sprintf("spliced is not running: nothing answers on %s (%s); start it (systemctl start spliced) or point -s at its control socket", e.Socket, reason)
}

func (e *NotRunningError) Unwrap() error { return e.Err }

// NotPermittedError means the user may not use the socket (or search
// its directory).
type NotPermittedError struct {
	Socket string
	Err    error
}

// Error says who may use the socket and how to be one of them: Go's
// message (`Get "http://spliced/v1/status": dial unix PATH: connect:
// permission denied`) names neither.
func (e *NotPermittedError) Error() string {
	msg := fmt.Sprintf("permission denied on the control socket %s: ", e.Socket)
	if fi, err := os.Stat(e.Socket); err == nil {
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Gid != 0 && fi.Mode().Perm()&0o060 == 0o060 {
			group := strconv.FormatUint(uint64(st.Gid), 10)
			if g, err := user.LookupGroupId(group); err == nil {
				group = g.Name
			}
			return msg + fmt.Sprintf("it is for root and the members of group %q (control.group); run splicectl with sudo, or as a member of %s (usermod -aG %s USER, then log in again)", group, group, group)
		}
		return msg + "it is for root only; run splicectl with sudo, or set control.group in spliced's configuration to a group of yours (the socket is then mode 0660)"
	}
	return msg + "its directory may not be searched; run splicectl with sudo"
}

func (e *NotPermittedError) Unwrap() error { return e.Err }

// send sends a request to the daemon; a socket nobody listens on is a
// *NotRunningError, one the user may not use a *NotPermittedError.
func (c *Client) send(req *http.Request) (*http.Response, error) {
	resp, err := c.http.Do(req)
	switch {
	case err == nil:
	case errors.Is(err, syscall.ENOENT), errors.Is(err, syscall.ECONNREFUSED):
		return nil, &NotRunningError{Socket: c.Socket, Err: err}
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return nil, &NotPermittedError{Socket: c.Socket, Err: err}
	}
	return resp, err
}

func (c *Client) do(ctx context.Context, method, path string, query url.Values, out any) error {
	u := "http://spliced/" + Version + path
	if len(query) > 0 {
		u += "?" + query.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, nil)
	if err != nil {
		return err
	}
	resp, err := c.send(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return responseError(resp, method, path)
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// responseError is the error a failed request's answer describes.
func responseError(resp *http.Response, method, path string) error {
	var e Error
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if json.Unmarshal(body, &e) == nil && e.Error != "" {
		return errors.New(e.Error)
	}
	return fmt.Errorf("%s %s: %s", method, path, resp.Status)
}

// Status returns the daemon's status.
func (c *Client) Status(ctx context.Context) (*Status, error) {
	var s Status
	return &s, c.do(ctx, http.MethodGet, "/status", nil, &s)
}

// FlowFilter selects flows; zero fields match anything.
type FlowFilter struct {
	Proxy, State, Addr string
	Port               uint16
}

// Flows lists flows.
func (c *Client) Flows(ctx context.Context, f FlowFilter) ([]Flow, error) {
	q := url.Values{}
	for k, v := range map[string]string{"proxy": f.Proxy, "state": f.State, "addr": f.Addr} {
		if v != "" {
			q.Set(k, v)
		}
	}
	if f.Port != 0 {
		q.Set("port", strconv.Itoa(int(f.Port)))
	}
	var fl []Flow
	return fl, c.do(ctx, http.MethodGet, "/flows", q, &fl)
}

// Flow returns one flow.
func (c *Client) Flow(ctx context.Context, id uint64) (*Flow, error) {
	var f Flow
	return &f, c.do(ctx, http.MethodGet, fmt.Sprintf("/flows/%d", id), nil, &f)
}

// Splice splices a flow and returns it afterwards.
func (c *Client) Splice(ctx context.Context, id uint64) (*Flow, error) {
	var f Flow
	return &f, c.do(ctx, http.MethodPost, fmt.Sprintf("/flows/%d/splice", id), nil, &f)
}

// Unsplice returns a spliced flow to its proxy.
func (c *Client) Unsplice(ctx context.Context, id uint64) (*Flow, error) {
	var f Flow
	return &f, c.do(ctx, http.MethodPost, fmt.Sprintf("/flows/%d/unsplice", id), nil, &f)
}

// Ruleset returns our table as the kernel has it, and the drift.
func (c *Client) Ruleset(ctx context.Context) (*Ruleset, error) {
	var r Ruleset
	return &r, c.do(ctx, http.MethodGet, "/ruleset", nil, &r)
}

// Events streams events to fn until ctx is done or fn returns an error.
func (c *Client) Events(ctx context.Context, fn func(Event) error) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://spliced/"+Version+"/events", nil)
	if err != nil {
		return err
	}
	resp, err := c.send(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		// An error object, not events: decoded as one, it was an empty
		// event, and the stream ended as if all was well.
		return responseError(resp, http.MethodGet, "/events")
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var e Event
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			return fmt.Errorf("event stream: %w", err)
		}
		if err := fn(e); err != nil {
			return err
		}
	}
	if ctx.Err() != nil {
		return nil
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("event stream: %w", err)
	}
	// The daemon ends a stream only when it stops: a follower that
	// ended quietly, with success, left its user (or script) to think
	// the stream had been followed to the end.
	return errors.New("the event stream ended: spliced stopped or restarted; run this again once it runs")
}
