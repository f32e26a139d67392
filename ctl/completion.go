package ctl

import (
	"context"
	"fmt"
)

const bashCompletion = `# bash completion for splicectl
_splicectl() {
    local cur prev words cword
    _init_completion || return
    local commands="status flows flow splice unsplice ruleset watch events config completion version help"
    case "${prev}" in
        -s) _filedir; return ;;
        flows) COMPREPLY=($(compgen -W "-proxy -state -addr -port" -- "$cur")); return ;;
        -state) COMPREPLY=($(compgen -W "proxied splicing spliced closing" -- "$cur")); return ;;
        ruleset) COMPREPLY=($(compgen -W "-diff" -- "$cur")); return ;;
        config) COMPREPLY=($(compgen -W "check" -- "$cur")); return ;;
        check) _filedir yaml; return ;;
        completion) COMPREPLY=($(compgen -W "bash" -- "$cur")); return ;;
        flow|splice|unsplice)
            COMPREPLY=($(compgen -W "$(splicectl flows 2>/dev/null | awk 'NR>1 {print $1}')" -- "$cur")); return ;;
    esac
    COMPREPLY=($(compgen -W "${commands} -s -j" -- "$cur"))
}
complete -F _splicectl splicectl
`

func (c *cli) completion(_ context.Context, args []string) error {
	if len(args) != 1 || args[0] != "bash" {
		return usageError{fmt.Errorf("use: splicectl completion bash")}
	}
	fmt.Fprint(c.out, bashCompletion)
	return nil
}
